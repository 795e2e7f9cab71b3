"""What a resumed `cit analyze` checks (its runs end to end are in test_cit.py, which builds them)."""

from forgetlab.experiments.cit_analysis import tasks_digest
from forgetlab.fv.tasks import ICLTask


def test_a_general_task_edited_under_its_old_name_has_another_digest():
    """What a resumed `cit analyze` checks besides the names: the general and last tasks' contents."""
    task = ICLTask("g", (("a", "b"), ("c", "d")), "Do .")
    assert tasks_digest([task]) == tasks_digest([ICLTask("g", (("a", "b"), ("c", "d")), "Do .")])
    for other in (ICLTask("g", (("a", "b"), ("c", "e")), "Do ."), ICLTask("g", (("a", "b"), ("c", "d")), "Do it ."),
                  ICLTask("h", (("a", "b"), ("c", "d")), "Do .")):
        assert tasks_digest([other]) != tasks_digest([task])
