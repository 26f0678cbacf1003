"""server.procs: /proc readings of this very process, and a free port that binds."""

import os
import socket
import subprocess
import sys

from server.procs import cpu_seconds, free_port, group_members, proc_stat, processes


def test_proc_stat_reads_this_process_and_none_for_a_gone_one():
    fields = proc_stat(os.getpid())
    assert fields[0] in "RS" and int(fields[1]) == os.getppid() and int(fields[2]) == os.getpgrp()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert proc_stat(child.pid) is None  # reaped: gone


def test_cpu_seconds_grow_with_work():
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))
    assert cpu_seconds(os.getpid()) > before


def test_processes_and_group_members_include_this_process():
    (mine,) = [(ppid, pgrp) for pid, _, ppid, pgrp in processes() if pid == os.getpid()]
    assert mine == (os.getppid(), os.getpgrp())
    assert os.getpid() in group_members(os.getpgrp())


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
