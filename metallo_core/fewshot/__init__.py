"""Few-shot learning maths: episodes, ProtoNet, meta-test fine-tuning and metrics, free of Ray and MLflow."""
