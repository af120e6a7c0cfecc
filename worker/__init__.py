"""The GPU side: the RQ worker, its job functions and image-index cache, the commands, and the method (``hybridgl``)."""
