from pipeline.planning import Shard, plan_shards, shard_id_for
from pipeline.records import DocumentRef, Stage, StageError


def ref(name: str, doc_id: str | None = None, **kw) -> DocumentRef:
    return DocumentRef(uri=f"/in/{name}", doc_id=doc_id or f"id-{name}", size=10, media_type="application/pdf", **kw)


def test_shards_are_deterministic_and_sized():
    refs = [ref(f"{i:02d}.pdf") for i in range(7)]
    a = plan_shards(refs, done_keys=set(), processed_elsewhere={}, shard_size=3, fingerprint="f")
    b = plan_shards(list(reversed(refs)), done_keys=set(), processed_elsewhere={}, shard_size=3, fingerprint="f")
    assert [s.shard_id for s in a.shards] == [s.shard_id for s in b.shards]
    assert [len(s.refs) for s in a.shards] == [3, 3, 1]
    assert a.to_do == 7 and a.already_done == 0
    assert len({s.shard_id for s in a.shards}) == 3


def test_shard_id_depends_on_settings_and_contents():
    refs = [ref("a.pdf")]
    assert shard_id_for(refs, "f1") != shard_id_for(refs, "f2")
    assert shard_id_for(refs, "f1") != shard_id_for([ref("a.pdf", doc_id="other")], "f1")


def test_done_documents_are_skipped_whatever_their_status():
    refs = [ref("a.pdf"), ref("b.pdf"), ref("c.pdf")]
    plan = plan_shards(
        refs, done_keys={("/in/a.pdf", "id-a.pdf")}, processed_elsewhere={}, shard_size=10, fingerprint="f"
    )
    assert plan.already_done == 1 and plan.to_do == 2
    assert [r.uri for r in plan.shards[0].refs] == ["/in/b.pdf", "/in/c.pdf"]


def test_renamed_copy_of_processed_content_becomes_a_duplicate():
    refs = [ref("old.pdf", doc_id="X"), ref("new-copy.pdf", doc_id="X")]
    plan = plan_shards(
        refs, done_keys={("/in/old.pdf", "X")}, processed_elsewhere={"X": "/in/old.pdf"}, shard_size=10, fingerprint="f"
    )
    (only,) = plan.shards[0].refs
    assert only.uri == "/in/new-copy.pdf" and only.duplicate_of == "/in/old.pdf"


def test_nothing_new_means_no_shards():
    refs = [ref("a.pdf")]
    plan = plan_shards(refs, done_keys={("/in/a.pdf", "id-a.pdf")}, processed_elsewhere={}, shard_size=2, fingerprint="f")
    assert plan.shards == () and plan.to_do == 0


def test_shard_round_trips_through_json_safe_dict():
    import json

    shard = Shard("s1", (ref("a.pdf"), ref("e.pdf", error=StageError(Stage.SOURCES, "empty_file", "0 bytes"))))
    again = Shard.from_dict(json.loads(json.dumps(shard.to_dict())))
    assert again == shard
