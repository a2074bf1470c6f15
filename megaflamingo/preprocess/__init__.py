"""Offline preprocessing, the library side of ``megaflamingo-preprocess``: :mod:`.embed` (manifest ->
Arrow shards of window embeddings, sharded and resumable; the merge). kNN few-shot manifests are built
by :mod:`megaflamingo.data.knn`, JSONL manifests from folders by :mod:`megaflamingo.data.manifests`."""
