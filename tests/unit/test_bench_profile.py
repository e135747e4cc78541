"""scripts/bench_profile.py: perf's report parsed and filed under the headings bench.py --profile prints."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

from support import REPO

_spec = importlib.util.spec_from_file_location("bench_profile", REPO / "scripts" / "bench_profile.py")
assert _spec is not None and _spec.loader is not None
bench_profile = importlib.util.module_from_spec(_spec)
sys.modules["bench_profile"] = bench_profile
_spec.loader.exec_module(bench_profile)

# The shape of `perf report --stdio --sort dso,sym -F sample,dso,sym` (perf 6.1), abridged from a real
# profile of the bridge during a download; column widths follow the longest name.
REPORT = """\
# To display the perf.data header info, please use --header/--header-only options.
#
# Total Lost Samples: 0
#
# Samples: 4K of event 'cpu-clock:ppp'
# Event count (approx.): 2071500000
#
#       Samples  Shared Object                           Symbol
# .............  ......................................  ..............................
#
           646  libc.so.6                               [.] __memmove_avx_unaligned_erms
           114  libc.so.6                               [.] __memset_avx2_unaligned_erms
            39  libc.so.6                               [.] malloc
           113  [kernel.kallsyms]                       [k] _copy_to_iter
            57  libcrypto.so.3                          [.] 0x000000000028eed9
            24  libcrypto.so.3                          [.] EVP_MD_CTX_copy_ex
            12  libssl.so.3                             [.] ssl3_read_bytes
            74  python3.11                              [.] _PyEval_EvalFrameDefault
             6  _ssl.cpython-311-x86_64-linux-gnu.so    [.] _ssl__SSLSocket_read
            33  loop.cpython-311-x86_64-linux-gnu.so    [.] __pyx_f_6uvloop_4loop_11SSLProtocol__do_read__copied
             2  [vdso]                                  [.] __vdso_clock_gettime
             3  haproxy                                 [.] process_stream

"""


def test_rows_are_parsed_with_their_counts_objects_and_symbols():
    rows = list(bench_profile.parse_report(REPORT))
    assert len(rows) == 12  # comments, headers and blank lines skipped
    assert rows[0] == (646, "libc.so.6", False, "__memmove_avx_unaligned_erms")
    assert rows[3] == (113, "[kernel.kallsyms]", True, "_copy_to_iter")
    assert rows[4] == (57, "libcrypto.so.3", False, "0x000000000028eed9")  # unresolved addresses keep their object


def test_samples_are_filed_under_what_they_were_spent_on():
    counts = bench_profile.categorise(bench_profile.parse_report(REPORT))
    assert counts == Counter(
        {
            "copies (memcpy, memset)": 646 + 114,
            "allocator and other libc": 39,
            "kernel": 113,
            "cryptography": 57 + 24,
            "TLS record layer": 12,
            "interpreter": 74 + 6,  # CPython and its C modules
            "event loop": 33 + 3,  # uvloop's compiled loop; HAProxy's own code
            "other": 2,
        }
    )


def test_a_path_to_the_object_is_filed_by_its_name():
    assert bench_profile.category("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", False, "AES_encrypt") == "cryptography"
    assert bench_profile.category("/usr/lib/x86_64-linux-gnu/libc.so.6", False, "__memcpy_avx_unaligned") == "copies (memcpy, memset)"
    assert bench_profile.category("libpython3.12.so.1.0", False, "_PyEval_EvalFrameDefault") == "interpreter"
    assert bench_profile.category("libc.so.6", False, "wmemset_chk_like_but_not") == "allocator and other libc"


def test_shares_add_up_and_costs_scale_with_the_measured_cpu():
    profiler = bench_profile.Profiler(REPO)
    profiler.counts = {"small": {"bridge": Counter({"kernel": 25, "interpreter": 75}), "haproxy": Counter()}}
    summary = profiler.summary({"bridge": {"small_cpu_us_per_request": 200.0}, "haproxy": {}})
    bridge = summary["small"]["bridge"]
    assert list(bridge) == list(bench_profile.CATEGORIES)
    assert bridge["kernel"] == {"share": 0.25, "cost": 50.0}
    assert bridge["interpreter"] == {"share": 0.75, "cost": 150.0}
    assert sum(part["share"] for part in bridge.values()) == 1.0
    assert summary["small"]["haproxy"] == {}  # nothing sampled: no shares rather than a division by zero
