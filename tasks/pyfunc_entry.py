"""The served model's definition, which MLflow runs when it loads the model (models from code,
so the model is not a pickled object). It is logged by ``tasks.pyfunc_model.log_fss_model``."""

import mlflow

from tasks.pyfunc_model import FSSPyfuncModel

mlflow.models.set_model(FSSPyfuncModel())
