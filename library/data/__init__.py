"""Stage 0, what training reads: images, buckets, captions, the dataset TOML, the dataset and its feature and latent caches."""
