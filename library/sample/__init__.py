"""gen_pfg.py's pieces: the sampler, prompt files, settings and image outputs."""
