"""HybridGL itself (SAM proposals + CLIP hybrid region features + spatial guidance), pure: no RQ, HTTP or Label Studio."""
