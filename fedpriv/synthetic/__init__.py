"""Malignancy-conditioned GAN: trained at each hospital (DP on the discriminator), sampled,
pooled by the server and shared back (`synthetic=augment`) or used for pretraining."""
