"""The data stage's typed config (``data:`` section of a preset) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.data.dedup import MinHashConfig
from pipelines.data.text import CodeRules, ProseRules


@dataclass
class DataConfig:
    """The data stage's slice of a preset (``data:`` section)."""

    input: list[str] = field(default_factory=list)  # files / folders / globs / s3:// gs:// URIs; [] = the stdlib
    out: str = "runs/data"
    tokenizer: str = ""  # folder / spec / named encoding (cl100k_base); "" = train a BPE here
    vocab_size: int = 8192  # for the trained BPE, chat specials included
    tokenizer_sample_bytes: int = 8_000_000
    seq_len: int = 256
    val_fraction: float = 0.05  # by content hash, so a document is in one split only
    blocks_per_shard: int = 8192
    text_field: str = "text"  # JSONL / JSON / Parquet column holding the document
    code_extensions: list[str] = field(
        default_factory=lambda: [
            ".py",
            ".pyi",
            ".c",
            ".h",
            ".cc",
            ".cpp",
            ".hpp",
            ".js",
            ".ts",
            ".go",
            ".rs",
            ".java",
            ".sh",
            ".toml",
            ".cfg",
            ".ini",
            ".yaml",
            ".yml",
        ]
    )  # these files use the `code` profile; everything else `prose`
    stdlib_extensions: list[str] = field(default_factory=lambda: [".py", ".txt", ".rst"])
    max_doc_bytes: int = 1_000_000  # a longer document is cut to this many bytes (counted as cut)
    normalise: bool = True
    quality: bool = True
    pii: bool = True  # e-mail / IP addresses -> <EMAIL> / <IP_ADDRESS>
    exact_dedup: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    prose: ProseRules = field(default_factory=ProseRules)
    code: CodeRules = field(default_factory=CodeRules)
    samples_per_rule: int = 5  # dropped/<rule>.jsonl: what each rule removed, for inspection
    max_listed_malformed: int = 1000  # manifest lists malformed documents (source + reason) up to this many
    batch_size: int = 32  # files per process_files batch
    files_per_read_task: int = 32  # read_binary_files blocks = files / this (clamped to 1 .. 1024)
    shuffle_partitions: int = 0  # hash partitions of the dedup groupbys; 0 = auto (docs / 20k, >= CPUs)
    overwrite: bool = False


def check_config(cfg: DataConfig) -> None:
    """Refuse settings that cannot work, before any work starts."""
    mh = cfg.minhash
    if mh.enabled and mh.num_perm < mh.bands * mh.rows:
        raise ValueError(
            f"minhash.num_perm={mh.num_perm} < minhash.bands*minhash.rows={mh.bands * mh.rows}; "
            "raise num_perm or lower bands/rows"
        )
    if cfg.seq_len < 1 or cfg.blocks_per_shard < 1:
        raise ValueError("seq_len and blocks_per_shard must be >= 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"val_fraction={cfg.val_fraction} must be in [0, 1)")
