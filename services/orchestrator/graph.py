"""The stage graph of one job, as data: which nodes, what each reads and writes.

Pure functions: no I/O, no gRPC. The runner executes nodes as soon as their dependencies
have succeeded, so HPSS of the mix runs beside separation and the stem HPSS fan-out runs
in parallel.

    decode ─► separation ─► hpss:<stem> (each stem of the main recipe) ─► composite ─► normalize
       └────► hpss:mix ─────────────────────────────────────────────────────────────────┘
"""

from __future__ import annotations

from dataclasses import dataclass

from audiomesh.errors import InvalidInput

# Expected relative cost, for the overall progress fraction and the ETA.
STAGE_WEIGHTS = {"decode": 1.0, "separation": 60.0, "hpss": 6.0, "composite": 2.0, "normalize": 4.0}
VOCALS = "vocals"


@dataclass(frozen=True)
class Plan:
    """What a job will run and deliver, derived from the model's sources and the options."""

    job_id: str
    stems: tuple[str, ...]  # sources the separation writes
    main_stems: tuple[str, ...]  # summed into "main"
    ext: str  # extension of delivered tracks, ".wav" or ".flac"

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job_id}"

    def key(self, stage: str, track: str, ext: str = ".wav") -> str:
        return f"{self.prefix}/{stage}/{track}{ext}"

    @property
    def mix_key(self) -> str:
        return self.key("decode", "mix")

    def stem_key(self, stem: str) -> str:
        return self.key("separation", stem)

    def hpss_keys(self, source: str) -> tuple[str, str]:
        return self.key("hpss", f"{source}_harmonic"), self.key("hpss", f"{source}_percussive")

    def intermediate_tracks(self) -> dict[str, str]:
        """Delivered track name → the key of its un-normalized version."""
        tracks = {stem: self.stem_key(stem) for stem in self.stems}
        tracks["harmonic"], tracks["percussive"] = self.hpss_keys("mix")
        for name in ("main", "main_harmonic", "main_percussive"):
            tracks[name] = self.key("composite", name)
        return tracks

    def output_key(self, track: str) -> str:
        return self.key("output", track, self.ext)

    def composites(self) -> dict[str, list[str]]:
        return {
            "main": [self.stem_key(s) for s in self.main_stems],
            "main_harmonic": [self.hpss_keys(s)[0] for s in self.main_stems],
            "main_percussive": [self.hpss_keys(s)[1] for s in self.main_stems],
        }

    def nodes(self) -> list[tuple[str, str, list[str]]]:
        """(name, stage, depends_on) in a valid execution order."""
        nodes = [("decode", "decode", []), ("separation", "separation", ["decode"]), ("hpss:mix", "hpss", ["decode"])]
        nodes += [(f"hpss:{s}", "hpss", ["separation"]) for s in self.main_stems]
        nodes.append(("composite", "composite", ["separation", *[f"hpss:{s}" for s in self.main_stems]]))
        nodes.append(("normalize", "normalize", ["separation", "hpss:mix", "composite"]))
        return nodes


def make_plan(job_id: str, *, sources: list[str], two_stems: str, main_stems: list[str], ext: str) -> Plan:
    """Resolve the stems a model will write and the recipe of ``main``; refuse what cannot work."""
    if two_stems:
        if two_stems not in sources:
            raise InvalidInput(f"two_stems {two_stems!r} is not a source of this model; choose one of {sources}")
        stems = [two_stems, f"no_{two_stems}"]
    else:
        stems = list(sources)
    if main_stems:
        unknown = [s for s in main_stems if s not in stems]
        if unknown:
            raise InvalidInput(f"main_stems {unknown} are not stems of this job; choose from {stems}")
        recipe = list(dict.fromkeys(main_stems))
    else:
        recipe = [s for s in stems if s not in (VOCALS, f"no_{VOCALS}")] if VOCALS in stems else list(stems)
        if two_stems == VOCALS:
            recipe = [f"no_{VOCALS}"]
        if not recipe:
            raise InvalidInput("main would be empty: set main_stems")
    return Plan(job_id=job_id, stems=tuple(stems), main_stems=tuple(recipe), ext=ext)


def overall_fraction(nodes) -> float:
    """Progress of a job, each node weighted by its stage's expected cost."""
    total = done = 0.0
    for node in nodes:
        weight = STAGE_WEIGHTS.get(node.stage, 1.0)
        total += weight
        done += weight * node.fraction
    return done / total if total else 0.0
