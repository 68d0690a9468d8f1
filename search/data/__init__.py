"""A search's data, set up once: found, loaded with the search's options (decoded by Ray tasks),
audited and checked (`search_data`); external test sets decoded as the data and their classes
matched (`external_sets`). The formats themselves are the `ingest` package's."""
