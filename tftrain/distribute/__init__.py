"""Clusters, strategies and the local launcher."""
