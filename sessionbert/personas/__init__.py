"""Personas: user embeddings, K-means with cosine silhouette, cluster -> persona mapping."""
