"""The task graph and the queue that hands its tasks to worker groups (pure Python, no Ray)."""

import pytest

from orchestrator import load_config
from orchestrator.engine.graph import COPY, TRAIN, plan
from orchestrator.engine.queue import DONE, WAIT, TaskQueue, shape_of

TINY = ["data.num_classes=6", "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3"]


def test_chains_depend_on_their_previous_step_and_share_version_0():
    graph = plan(load_config(None, TINY))
    tasks = graph.tasks
    assert list(tasks) == ["independent/step-000", "independent/step-001", "independent/step-002",
                           "bct/step-000", "bct/step-001", "bct/step-002"]
    assert tasks["independent/step-000"].deps == ()
    assert tasks["bct/step-000"].action == COPY and tasks["bct/step-000"].deps == ("independent/step-000",)
    assert tasks["bct/step-002"].action == TRAIN and tasks["bct/step-002"].deps == ("bct/step-001",)
    unshared = plan(load_config(None, [*TINY, "resources.share_first_version=false"])).tasks
    assert unshared["bct/step-000"].deps == () and unshared["bct/step-000"].action == TRAIN


def test_seeds_and_upstream_models_are_tasks_of_the_same_graph():
    graph = plan(load_config(None, [*TINY, "seeds=[1, 2]"]))
    assert set(graph.runs) == {"seed-1", "seed-2"} and len(graph.tasks) == 12
    assert graph.tasks["seed-2/bct/step-001"].deps == ("seed-2/bct/step-000",)
    replacement = load_config("configs/replacement_synthetic.yaml")
    graph = plan(replacement)
    upstream = [p for p, r in graph.runs.items() if r.role == "upstream"]
    assert upstream and all(p.startswith("upstream/") for p in upstream)
    at = replacement.scenario.replace_at[0]
    key = replacement.methods[0].key
    step = graph.tasks[f"{key}/step-{at:03d}"]
    assert any(d.startswith("upstream/") for d in step.deps)  # the swapped-in model trains first


def queue_for(*overrides, done=(), reuse=True, step_by_step=False):
    graph = plan(load_config(None, [*TINY, *overrides]))
    tasks = list(graph.tasks.values())
    return TaskQueue(tasks, set(done), reuse, step_by_step), shape_of(tasks[0])


def test_a_group_keeps_its_chain_and_a_second_group_takes_the_other():
    queue, shape = queue_for()
    a, b = queue.open_group(shape), queue.open_group(shape)
    assert queue.claim(a, 0) == "independent/step-000"
    assert queue.claim(b, 0) == WAIT  # bct's version 0 is a copy of the running task
    queue.complete("independent/step-000")
    assert queue.claim(a, 1) == "independent/step-001"  # its own chain first
    assert queue.claim(b, 0) == "bct/step-000"
    assert queue.claim(b, 1) == WAIT  # its next step needs the copy first
    queue.complete("bct/step-000")
    assert queue.claim(b, 1) == "bct/step-001"
    assert sorted(queue.running()) == ["bct/step-001", "independent/step-001"]
    for task in ["independent/step-001", "bct/step-001"]:
        queue.complete(task)
    assert queue.claim(b, 2) == "bct/step-002" and queue.claim(a, 2) == "independent/step-002"
    queue.complete("bct/step-002")
    assert queue.claim(b, 3) == DONE  # nothing left that it could take
    queue.complete("independent/step-002")
    assert queue.finished() and [e for e, _ in queue.events].count("finished") == 6


@pytest.mark.parametrize("step_by_step, order", [
    (False, ["seed-1/bct/step-000", "seed-1/bct/step-001", "seed-1/bct/step-002", "seed-2/bct/step-000"]),
    (True, ["seed-1/bct/step-000", "seed-2/bct/step-000", "seed-1/bct/step-001", "seed-2/bct/step-001"]),
])
def test_one_group_takes_its_chain_or_every_seeds_step_first(step_by_step, order):
    """A sweep's trial hands out step by step: with fewer groups than seeds, step k of every seed comes
    before any seed's step k+1, so the trial reaches the scheduler after its first steps."""
    queue, shape = queue_for("seeds=[1, 2]", "methods=[{name: bct}]", step_by_step=step_by_step)
    group = queue.open_group(shape)
    claimed = []
    for seq in range(len(order)):
        claimed.append(queue.claim(group, seq))
        queue.complete(claimed[-1])
    assert claimed == order


def test_every_rank_and_a_restarted_group_get_the_same_answers():
    queue, shape = queue_for()
    group = queue.open_group(shape)
    assert queue.claim(group, 0) == "independent/step-000"
    assert queue.claim(group, 0) == "independent/step-000"  # rank 1 asks for the same claim
    queue.complete("independent/step-000")
    assert queue.claim(group, 1) == "independent/step-001"
    # Ray Train restarted the group: it replays its claims from 0 (skipping the finished one)
    assert [queue.claim(group, 0), queue.claim(group, 1)] == ["independent/step-000", "independent/step-001"]
    assert queue.running() == ["independent/step-001"]


def test_a_failure_stops_its_dependents_and_nothing_else():
    queue, shape = queue_for(done={"independent/step-000", "bct/step-000"})
    a, b = queue.open_group(shape), queue.open_group(shape)
    assert queue.claim(a, 0) == "independent/step-001" and queue.claim(b, 0) == "bct/step-001"
    queue.close_group(a, "boom")
    assert queue.failures() == {"independent/step-001": "boom",
                                "independent/step-002": "needs independent/step-001, which failed"}
    queue.complete("bct/step-001")
    assert queue.claim(b, 1) == "bct/step-002"
    queue.complete("bct/step-002")
    assert queue.claim(b, 2) == DONE and queue.finished()


def test_a_group_that_ends_without_finishing_its_task_fails_it():
    queue, shape = queue_for()
    group = queue.open_group(shape)
    queue.claim(group, 0)
    queue.close_group(group)
    assert "without finishing" in queue.failures()["independent/step-000"]


def test_a_group_that_fails_before_taking_a_task_fails_its_shape_instead_of_being_reopened():
    """E.g. workers that cannot see the run: another group of that shape would fail the same way."""
    queue, wide = queue_for("resources.steps={0: {num_workers: 2}}", "resources.share_first_version=false")
    narrow = (1, False, 1.0)
    group = queue.open_group(wide)
    queue.close_group(group, "RunError: node b does not see the run")
    assert set(queue.failures()) == {t for t in queue.tasks}  # every later step needs a step-0 task
    assert queue.failures()["bct/step-000"].endswith("failed before it took a task: RunError: node b does not see the run")
    assert queue.demand() == {} and queue.finished()
    queue, wide = queue_for("resources.steps={0: {num_workers: 2}}", "resources.share_first_version=false",
                            done={"independent/step-000", "bct/step-000"})
    queue.close_group(queue.open_group(narrow), "boom")
    assert queue.failures()["independent/step-001"].endswith("boom") and queue.finished()


def test_groups_take_only_tasks_of_their_resource_shape():
    queue, wide = queue_for("resources.steps={0: {num_workers: 2}}", "resources.share_first_version=false")
    shape = (1, False, 1.0)
    assert wide == (2, False, 1.0)
    narrow = queue.open_group(shape)
    assert queue.demand() == {wide: 2}
    assert queue.claim(narrow, 0) == DONE  # nothing of its shape can become ready without a wide group
    big = queue.open_group(wide)
    assert queue.claim(big, 0) == "independent/step-000"
    queue.complete("independent/step-000")
    assert queue.demand() == {wide: 1, shape: 1}


def test_without_reuse_every_group_trains_one_task():
    queue, shape = queue_for(reuse=False)
    group = queue.open_group(shape)
    assert queue.claim(group, 0) == "independent/step-000"
    queue.complete("independent/step-000")
    assert queue.claim(group, 1) == DONE
    assert queue.free_groups() == {shape: 1} and queue.demand() == {shape: 2}


@pytest.mark.parametrize("done", [set(), {"independent/step-000"}])
def test_finished_tasks_are_never_handed_out(done):
    queue, shape = queue_for(done=done)
    group = queue.open_group(shape)
    assert queue.claim(group, 0) not in done


def test_a_cross_modal_experiment_is_a_graph_of_encodings_and_stages():
    from orchestrator.config import load_raw
    from orchestrator.config.crossmodal import parse_crossmodal
    from orchestrator.engine.graph import ENCODE, PRETRAIN, STAGE

    cfg = parse_crossmodal(load_raw("configs/xbt_synthetic.yaml", ["seeds=[0]"]))
    graph = plan(cfg)
    pretrain = [t.name for t in graph.tasks.values() if t.action == PRETRAIN]
    encodes = [t for t in graph.tasks.values() if t.action == ENCODE]
    assert [t.name for t in encodes] == ["encode-old", "encode-new"]
    assert len(pretrain) == 2 and [t.deps for t in encodes] == [(pretrain[0],), (pretrain[1],)]  # both CLIPs upstream
    stages = [t for t in graph.tasks.values() if t.action == STAGE]
    assert stages and all({"encode-old", "encode-new"} <= set(t.deps) for t in stages)
    queue = TaskQueue(list(graph.tasks.values()), set(pretrain))
    group = queue.open_group(shape_of(encodes[0]))
    assert [queue.claim(group, 0), queue.claim(queue.open_group(shape_of(encodes[0])), 0)] == ["encode-old", "encode-new"]


def test_the_upstream_clip_is_pretrained_once_for_every_seed():
    from orchestrator.engine.graph import PRETRAIN

    graph = plan(load_config("configs/fscil_synthetic.yaml", ["seeds=[0, 1]"]))
    pretrain = [t for t in graph.tasks.values() if t.action == PRETRAIN]
    assert len(pretrain) == 1 and pretrain[0].run == ""  # at the experiment's root, shared by the seeds
    firsts = [t for t in graph.tasks.values() if t.step == 0]
    assert len(firsts) == 2 * 4 and all(t.deps == (pretrain[0].id,) for t in firsts)  # 2 seeds x 4 methods


def test_a_second_group_is_wanted_while_the_shared_version_0_trains():
    """bct's chain waits for independent's version 0: its group may start meanwhile, but a chain that
    a group is already on wants no second one."""
    queue, shape = queue_for()
    assert queue.demand() == {shape: 1}  # independent/step-000; bct/step-000 needs it, not yet running
    group = queue.open_group(shape)
    queue.claim(group, 0)
    assert queue.demand() == {shape: 1}  # independent's chain has its group; bct's is about to be ready
    queue.complete("independent/step-000")
    queue.claim(group, 1)
    assert queue.demand() == {shape: 1}
    unshared, shape = queue_for("resources.share_first_version=false", "seeds=[0, 1]")
    assert unshared.demand() == {shape: 4}  # 2 seeds x 2 methods, all independent


def test_a_group_waits_while_the_step_it_needs_is_ready_for_a_group_between_tasks():
    """The race a real run hit: a wide group asks for its first task just after the narrow group
    committed step 0 and before it claimed step 1; step 1 is then neither running nor done, yet it is
    about to start, so the wide group waits for step 2 instead of leaving (and a third group opening)."""
    queue, narrow = queue_for("resources.steps={2: {num_workers: 2}}", "methods=[{name: bct}]")
    wide = (2, False, 1.0)
    a = queue.open_group(narrow)
    assert queue.claim(a, 0) == "bct/step-000"
    queue.complete("bct/step-000")
    b = queue.open_group(wide)
    assert queue.claim(b, 0) == WAIT  # step 1 is ready and a's to take
    assert queue.claim(a, 1) == "bct/step-001"
    assert queue.claim(b, 0) == WAIT
    queue.complete("bct/step-001")
    assert queue.claim(b, 0) == "bct/step-002" and queue.claim(a, 2) == DONE
