"""Knowledge distillation: `compress=kd` (soft targets) and `compress=pkd` (plus the patient loss).

    kd    loss = (1-α)·task + α·T²·KL(teacher_T ‖ student_T)          (Hinton et al., 2015)
    pkd   loss = kd + β·Σ_pairs mean ‖h_s/‖h_s‖ − h_t/‖h_t‖‖²          (Sun et al., 2019)

`prepare_model` loads the frozen teacher (a finished run, a saved model directory, an offline asset
or hub id, or the run's own model) and returns the student: the teacher cut to its first, alternate
or every k-th layers, or the run's configured model. `wrap_module` returns `Distill`, the task's own
module (same metrics, evaluation and optimiser) whose training step adds the teacher's losses; "task"
above is the task module's own training loss (the dialog task's: reply LM + next-utterance). The
teacher is held outside the module's registered children, so it is in no checkpoint and no optimiser.

Layer numbers a user writes are 1-based hidden-state numbers: 1 is the first layer's output (0 would
be the embeddings), as in the PKD paper's teacher layers {2,4,6,8,10} for a 12→6 student.

    losses.py      the losses, pure functions
    student.py     which layers the student keeps and the cut (through the family adapter)
    teacher.py     where the teacher comes from
    module.py      Distill, the LightningModule with the distillation objective
    compressor.py  Distillation, the kd/pkd compressor
"""

from squeeze.compress.distillation.compressor import Distillation
from squeeze.compress.distillation.module import Distill

__all__ = ["Distill", "Distillation"]
