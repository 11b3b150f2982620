"""prepare_features.py's pieces: settings, the job list, the decode/encode/write pipeline, and the
latent caches; train_pfg.py --tagger_model runs the same job through `run.prepare_features`."""
