"""Plain nn.Module builders (no Lightning). `build_backbone` is the one entry point."""

from trainer.models.registry import ARCHS, build_backbone, forward_checked

__all__ = ["ARCHS", "build_backbone", "forward_checked"]
