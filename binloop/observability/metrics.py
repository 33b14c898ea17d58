"""Every Prometheus metric binloop exports, defined once. Labels stay low in cardinality:
a bin id is allowed, a frame id never is."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A handler may run a whole training (the trainer's): minutes to hours, so the latency buckets
# go on up to 4 h instead of piling every training into +Inf.
HANDLER_BUCKETS = (*LATENCY_BUCKETS, 30, 60, 120, 300, 600, 1800, 3600, 2 * 3600, 4 * 3600)
# Per-stage inference time on an edge CPU (docs/edge-latency.md): read, decode, preprocess and
# postprocess take 0.05-0.5 ms, inference one to a few tens of ms. Fine buckets below 1 ms tell
# the small stages apart.
_STAGE_BUCKETS_MS = (
    *(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1, 1.5, 2, 3, 5, 7.5, 10, 15, 25, 50, 100, 250, 500, 1000),
)
STAGE_BUCKETS = tuple(round(ms / 1000, 7) for ms in _STAGE_BUCKETS_MS)

MESSAGES_CONSUMED = Counter(
    "binloop_messages_consumed_total",
    "Messages a service took off the bus",
    ["service", "route"],
)
MESSAGES_RETRIED = Counter(
    "binloop_messages_retried_total",
    "Messages nak'ed for redelivery after a delay",
    ["service", "route", "error_type"],
)
DEAD_LETTERS = Counter(
    "binloop_dead_letters_total",
    "Messages sent to the dead-letter subject",
    ["service", "route", "error_type"],
)
EVENTS_PUBLISHED = Counter(
    "binloop_events_published_total", "Events published", ["service", "route"]
)
HANDLER_SECONDS = Histogram(
    "binloop_handler_seconds",
    "Time a handler spent on one delivery (message or batch)",
    ["service", "route"],
    buckets=HANDLER_BUCKETS,
)

FRAMES_CAPTURED = Counter("binloop_frames_captured_total", "Frames captured", ["bin"])
FRAMES_INFERRED = Counter("binloop_frames_inferred_total", "Frames classified", ["bin"])
INFERENCE_STAGE_SECONDS = Histogram(
    "binloop_inference_stage_seconds",
    "Edge inferencer per-frame time by stage (read, decode, preprocess, infer, postprocess)",
    ["bin", "stage"],
    buckets=STAGE_BUCKETS,
)
FRAME_TO_ACTUATION_SECONDS = Histogram(
    "binloop_frame_to_actuation_seconds",
    "Capture to actuator done",
    ["bin"],
    buckets=LATENCY_BUCKETS,
)
DECISIONS = Counter(
    "binloop_decisions_total", "Items sent to each compartment", ["bin", "compartment"]
)
ABSTENTIONS = Counter(
    "binloop_abstentions_total", "Items sent to trash for low confidence", ["bin"]
)
ACTUATOR_ERRORS = Counter("binloop_actuator_errors_total", "Actuator failures", ["bin", "error"])
ACTUATOR_JOURNAL_FAILURES = Counter(
    "binloop_actuator_journal_failures_total",
    "Journal records the bin's disk did not take, or a journal it could not read: the "
    "actuator went on with its memory alone (a restart then forgets those items)",
    ["bin"],
)
ACTUATOR_STALE_COMMANDS = Counter(
    "binloop_actuator_stale_commands_total",
    "Commands refused because their item was captured longer ago than max_command_age_s",
    ["bin"],
)
MODEL_VERSION_SERVED = Gauge(
    "binloop_model_served_version", "Model version the edge inferencer serves", ["bin", "model"]
)
MODEL_SWAPS = Counter("binloop_model_swaps_total", "Live model swaps", ["bin"])
UPLOADER_BACKLOG = Gauge(
    "binloop_uploader_backlog_frames", "Frames waiting for the object store", ["bin"]
)
UPLOADED_BYTES = Counter("binloop_uploaded_bytes_total", "Bytes written to the store", ["bin"])
SAMPLER_SELECTIONS = Counter(
    "binloop_sampler_selections_total", "Frames picked for labeling", ["strategy"]
)
SAMPLER_RATE_LIMITED = Counter(
    "binloop_sampler_rate_limited_total", "Candidates dropped by the per-bin limit", ["bin"]
)
LABELS = Counter("binloop_labels_total", "Annotations received", ["backend"])
DATASET_SNAPSHOTS = Counter("binloop_dataset_snapshots_total", "Dataset snapshots written")
TRAINING_RUNS = Counter("binloop_training_runs_total", "Training runs", ["outcome"])
TRAINING_SECONDS = Histogram(
    "binloop_training_duration_seconds",
    "Wall time of a training run",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
MODEL_ACCURACY = Gauge(
    "binloop_model_eval_accuracy_ratio",
    "Accuracy on the fixed evaluation set (role: candidate or champion)",
    ["model", "role"],
)
MODEL_PROMOTIONS = Counter(
    "binloop_model_promotions_total", "Registry decisions", ["model", "decision"]
)
FRAMES_SKIPPED = Counter(
    "binloop_frames_skipped_total",
    "Source frames the frame-ingestor could not use (corrupt, unreadable, bad replay line)",
    ["bin", "reason"],
)
FRAMES_UNANNOUNCED = Counter(
    "binloop_frames_unannounced_total",
    "Announce markers a killed frame-ingestor left that the next start gave up, by reason "
    "(frame_gone: killed before the frame was written; unreadable_marker: neither the marker "
    "nor its frame can be read; an unreadable marker beside an intact frame is rebuilt)",
    ["bin", "reason"],
)
BLOB_PUTS = Counter(
    "binloop_blob_puts_total",
    "Object-store writes by backend; outcome 'unchanged' means the same bytes were already there",
    ["backend", "outcome"],
)
LABELING_BACKLOG = Gauge(
    "binloop_labeling_backlog_samples",
    "Selected samples handed to a labeling backend and not yet annotated",
    ["backend"],
)
LABELING_LEAD_TIME = Histogram(
    "binloop_labeling_lead_time_seconds",
    "Time from a sample's selection to its annotation",
    ["backend"],
    buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
)
SAMPLER_NEAR_DUPLICATES = Counter(
    "binloop_sampler_near_duplicates_total",
    "Candidates dropped as near-duplicates (pHash) of an earlier selection",
    ["bin"],
)
SAMPLER_BELOW_MIN_SCORE = Counter(
    "binloop_sampler_below_min_score_total",
    "Frames some strategy wanted whose combined weighted score stayed below min_score",
    ["bin"],
)
SAMPLER_REPEATS = Counter(
    "binloop_sampler_repeats_total",
    "Results (not redeliveries) for a frame already selected for the same model version",
    ["bin"],
)
LABEL_STUDIO_ERRORS = Counter(
    "binloop_label_studio_errors_total",
    "Failed calls to Label Studio, by operation and HTTP status or transport error",
    ["operation", "error"],
)
LABEL_STUDIO_WEBHOOKS = Counter(
    "binloop_label_studio_webhooks_total",
    "Webhook calls by outcome (published, unchanged, ignored, unauthenticated, rejected, failed)",
    ["outcome"],
)
LABEL_STUDIO_RECONCILED = Counter(
    "binloop_label_studio_reconciled_total",
    "Annotations that reconciliation published because no webhook had brought them",
)

FLEET_SERVING_BINS = Gauge(
    "binloop_fleet_serving_bins",
    "Bins whose heartbeat says they serve this model version (fleet view)",
    ["model", "version"],
)
FLEET_SPOOL_BACKLOG = Gauge(
    "binloop_fleet_spool_backlog_frames",
    "Frames a bin's uploader still has to store, from its heartbeat (fleet view)",
    ["bin"],
)
UPLOADER_DROPPED = Counter(
    "binloop_uploader_dropped_frames_total",
    "Frames the uploader gave up, by reason (max_frames, max_bytes: the spool-full policy, "
    "before they reached the object store; unread_by_inferencer: the same, a frame the "
    "edge-inferencer had not read, given up last; uploaded_unread_by_inferencer: an uploaded "
    "frame past its retention the sweep deleted, over the spool limits, before the "
    "edge-inferencer read it; unreadable_entry: a broken queue file)",
    ["bin", "reason"],
)
UPLOADER_RETRIES = Counter(
    "binloop_uploader_retries_total",
    "Upload attempts that failed and wait for the next backoff step, by error type",
    ["bin", "error_type"],
)
UPLOADER_BACKLOG_BYTES = Gauge(
    "binloop_uploader_backlog_bytes", "Bytes of spooled frames waiting for the store", ["bin"]
)
UPLOADER_PRIORITIZED = Counter(
    "binloop_uploader_prioritized_total",
    "Frames moved to the front of the upload queue because the sampler selected them",
    ["bin"],
)
