"""Models: the LM shell, token mixers, channel mixers and short-conv plug-ins."""
