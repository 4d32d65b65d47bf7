# Cython's view of engine/core.py's `_Run`, used only when core.py is compiled
# (`nudgeflow compile`; pure Python ignores this file): a C class whose
# attributes are C fields (exactly `_Run.__slots__`) and whose methods are called through a C
# table. Methods that hold a closure (a lambda, a generator) stay Python methods: not listed.
# tests/unit/test_compiled.py checks this file against core.py.
cimport cython

@cython.final
cdef class _Run:
    cdef public object count, event_props, js, old_wake, seg_before, sink, st, user, wall
    cdef public bint seg_dirty, seg_tracking
    cpdef apply(self, inp, now)
    cpdef finish(self, now)
    cpdef on_event(self, ev, t)
    cpdef on_profile(self, attrs, t)
    cpdef on_enroll(self, inp, t)
    cpdef on_member_check(self, inp, t)
    cpdef on_feedback(self, inp)
    cpdef on_call_result(self, res, t)
    cpdef segments_now(self, t)
    cpdef touch_segments(self, t)
    cpdef segment_entries(self, t)
    cpdef next_segment_edge(self, after)
    cpdef segment_edge(self, t)
    cpdef in_segment(self, name, t, inst=*)
    cpdef remember(self, cid, ts, keep_ms, keep_n)
    cpdef last_keyed(self, cid, refs, inst)
    cpdef count_since(self, cid, since)
    cpdef last_seen(self, cid)
    cpdef try_enter(self, j, t, trigger, event_id)
    cpdef replay_later(self, j, ik, t)
    cpdef rule_last(self, r, ik)
    cpdef convert(self, j, ik, t)
    cpdef exit(self, j, ik, reason, t)
    cpdef journey_of(self, ik, t)
    cpdef advance(self, until)
    cpdef wake(self, j, ik, t)
    cpdef move(self, j, ik, target, t)
    cpdef run(self, j, ik, t)
    cpdef run_step(self, j, ik, inst, node, t)
    cpdef run_send(self, j, inst, node, t)
    cpdef run_wait_until(self, j, ik, inst, node, t)
    cpdef run_wait_window(self, inst, node, t)
    cpdef run_wait_for(self, inst, node, t)
    cpdef run_update(self, j, inst, node, t)
    cpdef run_call(self, j, inst, node, t)
    cpdef context(self, j, inst)
    cpdef render(self, j, inst, step, msg, key, t)
