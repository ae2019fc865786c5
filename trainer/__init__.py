"""Training side of the TiTok system: models, config, data reader, train loop, stages, sampling."""
