"""One module per on-disk dataset format: how to locate, decode and (where possible) download it."""
