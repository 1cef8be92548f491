"""Plain nn.Module builders (no Lightning). `build_backbone` is the one entry point."""

from trainer.models.registry import ARCHS, build_backbone

__all__ = ["ARCHS", "build_backbone"]
