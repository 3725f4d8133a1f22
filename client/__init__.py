"""fedabus ClientApp: the federated glue around local training, privacy, and what may leave a site."""
