"""The web process and everything light around it (queue, delivery, Label Studio client, prelabel): never imports torch."""
