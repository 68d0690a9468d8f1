import tempfile, pytest, sys
from mlflow.tracking import MlflowClient
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
d = tempfile.mkdtemp()
c = MlflowClient(f"sqlite:///{d}/m.db"); e = c.create_experiment("x"); r = c.create_run(e)
get_artifact_repository(r.info.artifact_uri).log_artifact(__file__)
sys.exit(pytest.main(['-q','-p','no:cacheprovider','tests/test_search.py','-k','mlflow_cannot_take']))
