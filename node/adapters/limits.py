"""Limits on adapter packages: how big each package file may be before it is parsed, and the largest
LoRA rank nodes serve. One home: verify, pack and the engine's default slot rank all read them here."""

# The rank every node's slots hold by default (EngineConfig.max_lora_rank): a package of a higher rank
# would verify, publish and be listed, and then fail every request, so pack and verify refuse it.
MAX_LORA_RANK = 16
# lora_alpha beyond this makes B * alpha / r overflow half precision on the way into a slot.
MAX_LORA_ALPHA = 65536.0

# Files one package may hold (a manifest's list; an upload's archive; a peer's transfer plan).
MAX_FILES = 64
# The files beside its config and weights (a model card, a license), together: every node that serves the
# adapter fetches and keeps them, and nothing reads them, so a publisher could pad a few-KB adapter to the
# whole --max-package-bytes (4 GiB) on every node. Refused in the manifest, before any byte is fetched.
MAX_EXTRA_BYTES = 1 << 20

# Bytes read before parsing, for files a stranger may have written (uploads, peers, downloads).
MAX_MANIFEST_BYTES = 1 << 20
MAX_BASE_NAME_CHARS = 256  # a base model's human name in a manifest (a folder's or a hub id's)
MAX_SIGNATURE_BYTES = 4096  # signature.json is ~400 bytes; the p2p SIGNATURE frame has the same limit
MAX_ADAPTER_CONFIG_BYTES = 256 << 10
# A LoRA of every target on 128 layers has ~1,800 tensors at ~150 header bytes each: 4 MiB is ample,
# and far below the safetensors format's own 100 MB.
MAX_SAFETENSORS_HEADER_BYTES = 4 << 20
