"""Site data: layouts, reading, validation, preprocessing, tri-plane extraction, synthetic sites, loaders."""
