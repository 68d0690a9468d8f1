"""Finalize and the report: the top-k configurations retrained (`retrain`), ensembled and chosen
(`ensemble`), read out on test and external sets, explained (saliency, importances) and written to
`final/` (`pipeline`, `report`, `saved_model`)."""
