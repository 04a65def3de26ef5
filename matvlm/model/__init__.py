"""The hybrid model core: config and placement, the Mamba-2 mixer, its scan, the model class, conversion."""
