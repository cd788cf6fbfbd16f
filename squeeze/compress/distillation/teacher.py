"""Where the teacher comes from: a finished run directory, a saved model directory, an offline asset or a
hub id (or the run's own model). Kept apart, as it was, until a shared model-reference resolver replaces it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from squeeze import assets, models
from squeeze.compress import checkpoint
from squeeze.errors import SqueezeError
from squeeze.record import RESULT_FILE, read_record


class TeacherLoading:
    """Distillation's teacher loading (needs self.teacher_source and self.head)."""

    def _load_teacher(self, model, tokenizer):
        """(teacher, what to call it, its directory or None); the tokenizer must be the run's."""
        if self.teacher_source is None:
            return model, "the configured model", None
        source = str(self.teacher_source)
        path = Path(source).expanduser()
        if path.is_dir():
            model_dir = self._model_dir(path)
        elif source.startswith((".", "/", "~")):
            raise SqueezeError(f"teacher={source} does not exist; give a finished run directory, a saved model "
                               "directory, an asset name or a hub id")
        elif source in assets.ASSETS:
            model_dir = assets.locate(source)
        else:
            model_dir = None
        location = str(model_dir) if model_dir is not None else source
        try:
            teacher = checkpoint.load(model_dir, self.head) if model_dir is not None else \
                models.HEADS[self.head].from_pretrained(source)
            teacher_tokenizer = AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SqueezeError(f"teacher={source}: no teacher checkpoint could be loaded ({first}); "
                               "give a finished run directory, a saved model directory or an offline asset") from e
        if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise SqueezeError(
                f"teacher {source} uses another tokenizer than the run's model ({len(teacher_tokenizer)} vs "
                f"{len(tokenizer)} tokens, or other ids); pass the model= the teacher was trained from, or "
                "student.from=model with a model of the teacher's tokenizer"
            )
        return teacher, source, model_dir

    def _model_dir(self, path: Path) -> Path:
        if (path / RESULT_FILE).exists():
            record = read_record(path)
            trained_head = ((record.get("config") or {}).get("task") or {}).get("head")
            if trained_head and trained_head != self.head:
                raise SqueezeError(f"teacher run {path} was trained with a {trained_head} head but this task needs "
                                   f"{self.head}; give a teacher trained on this task")
            model_dir = path / "model"
            if not (model_dir / "config.json").exists():
                raise SqueezeError(f"teacher run {path} has no saved model ({model_dir} is missing: the run "
                                   f"{record.get('status', 'did not finish')}); train the teacher to the end first")
            return model_dir
        if (path / "config.json").exists():
            return path
        raise SqueezeError(f"teacher={path} is neither a squeeze run directory (result.json + model/) nor a saved "
                           "model directory (config.json): the teacher checkpoint is missing")
