"""Storage: the database lifecycle, the readings repository, the series cache, aggregation."""
