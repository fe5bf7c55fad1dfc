"""Networks, losses and augmentations: the building blocks the training loops use."""
