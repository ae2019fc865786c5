"""Object storage, local services (Ray head, MLflow, S3) and launch helpers."""
