"""fedabus ServerApp: strategy, aggregation, checkpoint/resume, MLflow logging, evaluation orchestration."""
