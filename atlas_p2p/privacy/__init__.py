"""What leaves a device, measured (DESIGN 10): leakage of the activations sent at a split,
an inversion attack on them, and the defences with their cost."""
