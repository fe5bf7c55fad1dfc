"""Training loops: the SSL teacher, KD students and encoding, trajectory matching, the linear
probe, and the resumable checkpoints they share."""
