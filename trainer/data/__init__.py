"""Fixed datasets: sources -> FixedDataset (arrays, labels, class names, fingerprint)
-> in-memory loader -> LightningDataModule."""
