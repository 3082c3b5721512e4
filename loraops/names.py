"""The project's file names and MLflow/DVC tag names, one place: registered versions and dvc.yaml depend on them.

The values are recorded in the MLflow registry (tags, artifact paths) and named in dvc.yaml (outs,
metrics, plots): changing one orphans what earlier runs recorded.
"""

# --- files in the checkout (relative to the project root) ---------------------------------------
PARAMS_FILE = "params.yaml"
DVC_LOCK_FILE = "dvc.lock"
DATA_DVC_FILE = "data.dvc"
# Files whose content lineage records by hash of its own; a change to them is not "dirty code".
LINEAGE_FILES = (DVC_LOCK_FILE, DATA_DVC_FILE, PARAMS_FILE)
RUN_LOCK_FILE = ".loraops/run.lock"  # the project lock one run at a time holds

# --- under paths.metrics_dir (DVC metrics and plots) --------------------------------------------
BASELINE_METRICS = "baseline.json"
ADAPTER_METRICS = "adapter.json"
TRAIN_METRICS = "train.json"
TRAIN_HISTORY = "train_history.json"
GATE_DECISION = "gate.json"
PLOTS_DIR = "plots"  # the loss series dvc.yaml's plots draw
TRAIN_LOSS_PLOT = "train_loss.json"
EVAL_LOSS_PLOT = "eval_loss.json"

# --- under paths.reports_dir ---------------------------------------------------------------------
CONTRACT_SUMMARY = "data_contract_summary.json"
CONTRACT_DOCS_DIR = "data_docs"  # the contract's GX Data Docs (a folder of HTML)
QUARANTINE_DIR = "quarantine"  # rows the contract set aside (line, reasons)
DIFF_FILE = "data_diff.json"  # the data diff against the champion; logged on the MLflow run
EXAMPLE_LOSSES_DIR = "example_losses"
INIT_ADAPTER_RECORD = "init_adapter.json"  # the adapter train.init_from resolved to (a dvc dep of train_adapter)

# --- written next to models and adapters --------------------------------------------------------
BASE_MARKER_FILE = "loraops-base.json"  # in a converted base model folder: what it was converted from
RUN_FILE = "loraops-run.json"  # in a checkpoint folder: the run that wrote it (resume)
INIT_ADAPTER_DIR = "init-adapter"  # in train.output_dir: the champion's adapter a warm start continues from
EXPORT_MANIFEST = "loraops-export.json"  # in a merged export folder

# --- MLflow run artifacts -------------------------------------------------------------------------
ADAPTER_ARTIFACT_PATH = "adapter"  # the adapter folder, on the training run and the hand-off run
TRAINING_ARTIFACTS = "training"  # trainer history (and the hand-off's train result)
TRAIN_RESULT_FILE = "train_result.json"
LINEAGE_ARTIFACTS = "lineage"  # params.yaml, dvc.lock and .dvc files as the run left them
LOCK_ARTIFACT = f"{LINEAGE_ARTIFACTS}/{DVC_LOCK_FILE}"
PARAMS_ARTIFACT = f"{LINEAGE_ARTIFACTS}/{PARAMS_FILE}"
REPORTS_ARTIFACTS = "reports"
MODEL_CARD_ARTIFACT = "model_card.md"
SAMPLES_ARTIFACT = "evaluation/samples.json"
LOSS_PLOT_ARTIFACT = "training/loss_curves.png"
LOGGED_MODEL_NAME = "adapter"  # the LoggedModel's name, and the run's model output
PYFUNC_ADAPTER_ARTIFACT = "adapter"  # key in the pyfunc's artifacts: <model>/artifacts/adapter/

# --- lineage tags (Lineage.as_tags: "loraops." + the field name) ----------------------------------
GIT_COMMIT_TAG = "loraops.git_commit"
GIT_DIRTY_TAG = "loraops.git_dirty"
DATA_MD5_TAG = "loraops.data_md5"
DVC_LOCK_MD5_TAG = "loraops.dvc_lock_md5"
PARAMS_HASH_TAG = "loraops.params_hash"
BASE_MODEL_TAG = "loraops.base_model"
BASE_REVISION_TAG = "loraops.base_revision"
DATA_SOURCE_TAG = "loraops.data_source"
LINEAGE_TAGS = (GIT_COMMIT_TAG, GIT_DIRTY_TAG, DATA_MD5_TAG, DVC_LOCK_MD5_TAG)  # what a rebuild needs
DVC_EXPERIMENT_TAG = "loraops.dvc_experiment"
DVC_EXPERIMENT_REV_TAG = "loraops.dvc_experiment_rev"

# --- run and version tags -------------------------------------------------------------------------
RUN_KEY_TAG = "loraops.run_key"
ADAPTER_KEY_TAG = "loraops.adapter_key"
ADAPTER_SHA256_TAG = "loraops.adapter_sha256"
GATE_TAG = "loraops.gate"
GATE_REASONS_TAG = "loraops.gate.reasons"
EVAL_TAG_PREFIX = "loraops.eval."  # + a gate evidence key
VAL_LOSS_TAG = "loraops.val_loss"
BASELINE_LOSS_TAG = "loraops.baseline_val_loss"
VAL_TOKENS_TAG = "loraops.val_tokens"
TRAIN_KEY_TAG = "loraops.train_key"  # the hand-off: the training worker's run
STAGE_TAG = "loraops.stage"
INIT_FROM_TAG = "loraops.init_from"  # NAME/VERSION whose adapter training started from (train.init_from)
WORKSPACE_TAG = "loraops.workspace"  # host:project folder of the process that opened the run

# --- Prefect links ----------------------------------------------------------------------------------
PREFECT_FLOW_RUN_ID_TAG = "loraops.prefect_flow_run_id"
PREFECT_FLOW_RUN_URL_TAG = "loraops.prefect_flow_run_url"
PREFECT_TRAIN_FLOW_RUN_ID_TAG = "loraops.prefect_train_flow_run_id"  # the worker's run, when training was handed off
PREFECT_TRAIN_FLOW_RUN_URL_TAG = "loraops.prefect_train_flow_run_url"

# --- promotion ------------------------------------------------------------------------------------
PROMOTION_REASON_TAG = "loraops.promotion.reason"
PROMOTION_FORCED_TAG = "loraops.promotion.forced"
PROMOTION_OVERRIDDEN_TAG = "loraops.promotion.overridden"
EXPORT_CHECK_TAG = "loraops.export_check"
ROLLBACK_TAG = "loraops.rollback.reason"
