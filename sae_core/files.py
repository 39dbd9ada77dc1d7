"""The name of every file and folder SAE Lab writes or reads, defined once.

Writers and readers import these names (the SAE output folder's names are SAELens's on-disk format and
a contract: see DESIGN.md). Nothing here touches the disk.
"""

from __future__ import annotations

# --- an SAE output folder (jobs/<id>/ or `--out DIR`) ---------------------------------------------
CFG_FILE = "cfg.json"  # SAELens config
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens weights
SPARSITY_FILE = "sparsity.safetensors"  # log10 firing frequency per latent
EVAL_FILE = "eval.json"  # holdout figures; its presence means "training finished"
METRICS_FILE = "metrics.jsonl"  # one record per log step, then a "done" event
TRAIN_CONFIG_FILE = "train_config.json"  # the TrainConfig the SAE was trained with
REFUSED_FILE = "error.txt"  # why training refused to start (bad config or data)
SAE_ZIP_FILE = "sae.zip"  # the download, built on request
INSPECT_DIR = "inspect"  # an inspect job's per-latent statistics and examples (the Explore page reads only these)
INSPECT_SUMMARY_FILE = "summary.json"  # inside inspect/: what was inspected, shapes, edges, what is present
INSPECT_LATENTS_FILE = "latents.safetensors"  # inside inspect/: the per-latent arrays
INSPECT_TOKENS_FILE = "tokens.json"  # inside inspect/: the text of every token id the examples and effects use
HELDOUT_CONTEXTS_FILE = "heldout_contexts.safetensors"  # a streamed SAE's held-out contexts: `tokens`, `context_ids`
SWEEP_FILE = "sweep.json"  # a sweep's run folder: its members (name, folder, overrides) and placement, written first
SWEEP_RESULT_FILE = "sweep_result.json"  # a sweep's run folder: each member's status and figures; present = finished
SAE_REQUIRED = (CFG_FILE, WEIGHTS_FILE)  # a folder holding these is a trained SAE
SAE_ZIP_MEMBERS = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, EVAL_FILE)

# --- checkpoints: <out>/checkpoints/step_000001000/{state.safetensors, state.json, checksums.json, COMPLETE}
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_MARKER = "COMPLETE"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_CHECKSUMS = "checksums.json"  # size and sha256 of the two files above, written after them

# --- a job's process files: <out>/logs/ -----------------------------------------------------------
TRAIN_REQUEST_FILE = "train_request.json"  # the job row's config, as the file `--config` names
EXTRACT_REQUEST_FILE = "extract_request.json"  # the same for an extraction job
EVALUATE_REQUEST_FILE = "evaluate_request.json"  # the same for a model evaluation job
MODEL_EVAL_FILE = "model_eval.json"  # a model evaluation's figures and context ids (its job folder)
INSPECT_REQUEST_FILE = "inspect_request.json"  # an inspect job's config
INSPECT_DONE_FILE = "inspect_done.json"  # an inspect job's summary in its own folder: it finished
LOGS_DIR = "logs"
STDOUT_LOG = "stdout.log"
STDERR_LOG = "stderr.log"
EXIT_FILE = "exit_code"  # written by jobwrap when torchrun ends
TORCHRUN_ERROR_FILE = "error.json"  # torchrun's copy of the first failing rank's error
TORCHRUN_LOG_DIR = "torchrun"  # per-rank stdout/stderr/error.json

# --- SAE_LAB_HOME ---------------------------------------------------------------------------------
DATABASE_FILE = "lab.db"
DATASETS_DIR = "datasets"
MODELS_DIR = "models"  # Hugging Face model folders for extraction
JOBS_DIR = "jobs"
DAEMON_FILE = "daemon.json"  # the launcher's pid and heartbeat
DAEMON_LOCK_FILE = "launcher.lock"
DAEMON_LOG_FILE = "launcher.log"
MEMORY_CONSTANTS_FILE = "memory_constants.json"  # GPU-measured constants of the memory estimate (optional)

# --- activation data ------------------------------------------------------------------------------
ACTIVATION_SUFFIXES = (".safetensors", ".npy")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")  # text an extraction reads
FEATURES_KEY = "features"  # ground-truth feature directions of a toy set
TOY_FILE = "toy.safetensors"
MANIFEST_FILE = "manifest.json"  # an activation folder's index, written last (its presence means "complete")
ACTIVATIONS_KEY = "activations"  # the [rows, d_in] tensor of a shard or toy file
TOKEN_IDS_KEY, CONTEXT_IDS_KEY, POSITIONS_KEY = "token_ids", "context_ids", "positions"  # per row of a shard
CONTEXTS_FILE = "contexts.safetensors"  # an extraction's token ids fed to the model: `tokens` [contexts, size]
EXTRACT_CONFIG_FILE = "extract_config.json"  # the ExtractConfig a folder's shards were computed with

# --- a Hugging Face model folder (read, never written) ---------------------------------------------
MODEL_CONFIG_FILE = "config.json"
# The settings transformers reads first; an `auto_map` in either would make it import the folder's Python.
MODEL_SETTINGS_FILES = (MODEL_CONFIG_FILE, "tokenizer_config.json")


def shard_file_name(index: int) -> str:
    """`shard_00000.safetensors`: the name of an extraction's index-th shard."""
    return f"shard_{index:05d}.safetensors"
