"""Distributed evaluation: Inception features, exact FID/IS statistics, Ray workers, MLflow logging."""
