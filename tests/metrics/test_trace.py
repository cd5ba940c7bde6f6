"""Tests of the device-trace breakdown: interval arithmetic, classification, real traces."""

import gzip
import os
import shutil
import time

import jax
import jax.numpy as jnp
import pytest

from efficientjax.metrics import trace

DATA = os.path.join(os.path.dirname(__file__), 'data')
FIXTURES = ('h100_llama_4layers_bf16', 'h100_quickstart_fp32')


def _xplane_dir(tmp_path, planes) -> str:
  """A logdir holding an xplane built from {plane: {line: [(name, start_ns, dur_ns, stats)]}}."""
  meta, stat_ids, text = {}, {}, []
  for plane, lines in planes.items():
    text.append(f'planes {{ name: "{plane}"')
    for line, events in lines.items():
      text.append(f'  lines {{ name: "{line}" timestamp_ns: 0')
      for name, start, dur, stats in events:
        mid = meta.setdefault(name, len(meta) + 1)
        st = ''.join(f'stats {{ metadata_id: {stat_ids.setdefault(k, len(stat_ids) + 1)} '
                     f'str_value: "{v}" }} ' for k, v in stats.items())
        text.append(f'    events {{ metadata_id: {mid} offset_ps: {start * 1000} '
                    f'duration_ps: {dur * 1000} {st}}}')
      text.append('  }')
    text += [f'  event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
             for n, i in meta.items()]
    text += [f'  stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
             for n, i in stat_ids.items()]
    text.append('}')
  run = tmp_path / 'plugins' / 'profile' / 'run'
  run.mkdir(parents=True)
  (run / 'host.xplane.pb').write_bytes(
      jax.profiler.ProfileData.text_proto_to_serialized_xspace('\n'.join(text)))
  return str(tmp_path)


def _ev(start, end, category, name=None):
  return trace.Event(start, end, name or f'{category}_{start}', category)


def _assert_adds_up(summary, rel=1e-6):
  total = sum(summary['categories_ms'].values())
  assert total == pytest.approx(summary['busy_ms'], rel=rel)
  assert sum(summary['categories_share'].values()) == pytest.approx(1.0, rel=rel)
  assert summary['idle_ms'] == pytest.approx(summary['window_ms'] - summary['busy_ms'])


# --- Interval arithmetic ----------------------------------------------------------------------


def test_partial_overlap_is_counted_once_and_split_evenly():
  busy, cats, names = trace.attribute([_ev(0, 10, 'matmul', 'a'), _ev(5, 15, 'attention', 'b')])
  assert busy == 15
  assert cats['matmul'] == 7.5 and cats['attention'] == 7.5
  assert names == {'a': 7.5, 'b': 7.5}


def test_nested_and_triple_overlap():
  # other [0,100) holds matmul [20,40); attention [30,60) overlaps both.
  busy, cats, _ = trace.attribute(
      [_ev(0, 100, 'other'), _ev(20, 40, 'matmul'), _ev(30, 60, 'attention')])
  assert busy == 100
  # [0,20) other; [20,30) other+matmul; [30,40) all three; [40,60) other+attention; rest other.
  assert cats['matmul'] == pytest.approx(5 + 10 / 3)
  assert cats['attention'] == pytest.approx(10 / 3 + 10)
  assert cats['other'] == pytest.approx(20 + 5 + 10 / 3 + 10 + 40)
  assert sum(cats.values()) == pytest.approx(busy)


def test_gaps_and_touching_intervals():
  busy, cats, _ = trace.attribute(
      [_ev(0, 10, 'matmul'), _ev(10, 20, 'other'), _ev(50, 60, 'collective')])
  assert busy == 30
  assert cats == {'attention': 0, 'matmul': 10, 'moe_dispatch': 0, 'collective': 10,
                  'other': 10}


def test_two_devices_averaged_and_aggregate_lines_skipped(tmp_path):
  logdir = _xplane_dir(tmp_path, {
      '/device:GPU:0': {
          'Stream #7(Compute)': [('nvjet_sm90_tst_x', 0, 100, {}),
                                 ('loop_add_fusion', 150, 50, {})],
          'Stream #9(Compute,Nccl)': [('ncclDevKernel_AllReduce_Sum_f32_RING_LL', 50, 100, {})],
          # Aggregates of the same time: must not count.
          'XLA Ops': [('fusion.1', 0, 400, {})],
          'XLA Modules': [('jit_step', 0, 400, {})],
      },
      '/device:GPU:1': {
          'Stream #7(Compute)': [('gemm_fusion_dot_3', 0, 100, {}),
                                 ('cudnn_generated_fort_native_sdpa_sm90_flash_fprop', 300, 100,
                                  {})],
      },
  })
  s = trace.summarize_trace(logdir, steps=2)
  assert s['available'] and s['source'] == 'device' and s['devices'] == 2
  # GPU:0 busy [0,200) = 200 ns; GPU:1 busy 200 ns; window [0,400) ns.
  assert s['busy_ms'] == pytest.approx(200e-6)
  assert s['window_ms'] == pytest.approx(400e-6)
  assert s['busy_fraction'] == pytest.approx(0.5)
  # Per-device means: GPU:0 matmul 50+25, collective 25+50, other 50; GPU:1 matmul 100,
  # attention 100.
  assert s['categories_ms']['matmul'] == pytest.approx((75 + 100) / 2 * 1e-6)
  assert s['categories_ms']['collective'] == pytest.approx(75 / 2 * 1e-6)
  assert s['categories_ms']['attention'] == pytest.approx(100 / 2 * 1e-6)
  assert s['categories_ms']['other'] == pytest.approx(50 / 2 * 1e-6)
  assert s['busy_ms_per_step'] == pytest.approx(100e-6)
  assert s['events'] == 5
  _assert_adds_up(s)


def test_window_given_overrides_span(tmp_path):
  logdir = _xplane_dir(tmp_path, {'/device:GPU:0': {'Stream #7(Compute)': [
      ('gemm_fusion_dot_3', 0, 1_000_000, {})]}})
  s = trace.summarize_trace(logdir, window_s=4e-3)
  assert s['window_ms'] == 4.0 and s['busy_ms'] == pytest.approx(1.0)
  assert s['busy_fraction'] == pytest.approx(0.25) and s['idle_ms'] == pytest.approx(3.0)


def test_host_uses_leaf_xla_ops_of_all_threads(tmp_path):

  def op(name):
    return {'hlo_op': name, 'hlo_module': 'jit_f'}

  logdir = _xplane_dir(tmp_path, {'/host:CPU': {
      'tf_XLAPjRtCpuClient/1': [
          ('ThunkExecutor::Execute', 0, 100, {}),   # wrapper: no hlo_op
          ('while.1', 0, 100, op('while.1')),       # encloses its body's ops
          ('dot.2', 10, 20, op('dot.2')),
          ('end: dot.2', 29, 1, {}),                # end marker: no hlo_op
          ('fusion.3', 40, 20, op('fusion.3')),
      ],
      'tf_XLAEigen/2': [('copy.4', 50, 20, op('copy.4'))],  # overlaps fusion.3 by 10
      'python3': [('PjitFunction(f)', 0, 200, {})],
  }})
  s = trace.summarize_trace(logdir)
  assert s['available'] and s['source'] == 'host' and s['devices'] == 1
  # dot [10,30) + union of fusion/copy [40,70): 50 ns busy over the op span [10,70).
  assert s['busy_ms'] == pytest.approx(50e-6)
  assert s['window_ms'] == pytest.approx(60e-6)
  assert s['categories_ms']['matmul'] == pytest.approx(20e-6)
  assert s['categories_ms']['other'] == pytest.approx(30e-6)
  assert {k['name'] for k in s['top_kernels']} == {'dot.2', 'fusion.3', 'copy.4'}
  _assert_adds_up(s)


# --- Classification ---------------------------------------------------------------------------

_NAMES = [
    # From the H100 fixtures.
    ('nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT', 'matmul'),
    ('nvjet_sm90_tss_128x192_64x5_1x1_h_bz_coopB_NTN', 'matmul'),
    ('gemm_fusion_dot_23', 'matmul'),
    ('void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_64x64_32x6_nn_align4>'
     '(cutlass_80_tensorop_s1688gemm_64x64_32x6_nn_align4::Params)', 'matmul'),
    ('cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_'
     'cga1x1x1_kernel0_0', 'attention'),
    ('cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_'
     'cga1x1x1_kernel0_0', 'attention'),
    ('void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*, void const*, '
     'void*, void*, unsigned int)', 'attention'),
    ('void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)',
     'attention'),
    ('loop_add_multiply_fusion', 'other'),
    ('input_add_multiply_reduce_fusion', 'other'),
    ('loop_convert_fusion_11', 'other'),
    ('loop_dynamic_update_slice_fusion_26', 'other'),
    ('input_scatter_fusion_1', 'other'),
    ('input_transpose_fusion_1', 'other'),
    ('memcpy128', 'other'),
    ('memcpy32_post', 'other'),
    ('Memset 0', 'other'),
    ('fusion_229', 'other'),
    ('wrapped_convert_2', 'other'),
    # XLA:CPU op names.
    ('dot.60', 'matmul'),
    ('dot_general.7', 'matmul'),
    ('convolution.3', 'matmul'),
    ('copy.213', 'other'),
    ('ynn_fusion.24', 'other'),  # says nothing by itself; see hlo_op_categories
    ('while.44', 'other'),
    # Other stacks.
    ('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64', 'matmul'),
    ('triton_gemm_dot_5', 'matmul'),
    ('flash_attention_fwd', 'attention'),
    ('mha_forward', 'attention'),
    ('nsa_select', 'attention'),
    ('ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)', 'collective'),
    ('ncclKernel_AllGather_RING_LL_Sum_int8_t', 'collective'),
    ('all-reduce.3', 'collective'),
    ('reduce-scatter.1', 'collective'),
    ('all-to-all.2', 'collective'),
    ('collective-permute-start.1', 'collective'),
    ('ragged_dot_fusion', 'moe_dispatch'),
    ('ragged-dot.4', 'moe_dispatch'),
    ('gmm', 'moe_dispatch'),
    ('tgmm', 'moe_dispatch'),
    ('moe_gmm_kernel', 'moe_dispatch'),
    ('grouped_gemm_kernel', 'moe_dispatch'),
    ('sort.1', 'other'),
]


@pytest.mark.parametrize('name,category', _NAMES)
def test_classify_kernel(name, category):
  assert trace.classify_kernel(name) == category


def test_classify_uses_hlo_op_name():
  assert trace.classify_kernel('fusion_7', 'ragged-dot.2') == 'moe_dispatch'
  assert trace.classify_kernel('loop_add_fusion', 'loop_add_fusion') == 'other'


def test_hlo_op_categories_looks_into_fusions():
  hlo = '\n'.join([
      'HloModule jit_f, entry_computation_layout={(f32[8,8]{1,0})->f32[8,8]{1,0}}',
      '',
      '%fused_computation.1 (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {',
      '  %p0 = f32[8,8]{1,0} parameter(0)',
      '  %p1 = f32[8,8]{1,0} parameter(1)',
      '  %d = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
      '  ROOT %e = f32[8,8]{1,0} exponential(%d)',
      '}',
      '',
      '%fused_computation.2 (p0: f32[8,8]) -> f32[8] {',
      '  %p0 = f32[8,8]{1,0} parameter(0)',
      '  ROOT %r = f32[8]{0} reduce(%p0, %p0), dimensions={1}, to_apply=%add',
      '}',
      '',
      'ENTRY %main (a: f32[8,8]) -> f32[8,8] {',
      '  %a = f32[8,8]{1,0} parameter(0)',
      '  %ynn_fusion.1 = f32[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%fused_computation.1',
      '  %ynn_fusion = f32[8]{0} fusion(%ynn_fusion.1), kind=kCustom, calls=%fused_computation.2',
      '  %cc = (f32[8,8]{1,0}, u8[0]{0}) custom-call(%a, %a), '
      'custom_call_target="__cudnn$fmhaSoftmax"',
      '  ROOT %ar = f32[8,8]{1,0} all-reduce(%ynn_fusion.1), to_apply=%add',
      '}',
  ])
  cats = trace.hlo_op_categories(hlo)
  assert cats[('jit_f', 'ynn_fusion.1')] == 'matmul'
  assert cats[('jit_f', 'ynn_fusion')] == 'other'
  assert cats[('jit_f', 'cc')] == 'attention'
  assert cats[('jit_f', 'ar')] == 'collective'


# --- Real traces ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def h100(tmp_path_factory):
  """{fixture name: summary} of the real H100 traces of 4 train steps."""
  out = {}
  for name in FIXTURES:
    run = tmp_path_factory.mktemp(name) / 'plugins' / 'profile' / 'run'
    run.mkdir(parents=True)
    with gzip.open(os.path.join(DATA, f'{name}.xplane.pb.gz')) as src, \
        open(run / 'vm.xplane.pb', 'wb') as dst:
      shutil.copyfileobj(src, dst)
    out[name] = trace.summarize_trace(str(run.parents[2]), steps=4)
  return out


@pytest.mark.parametrize('name', FIXTURES)
def test_h100_trace(h100, name):
  s = h100[name]
  print(name, {k: round(v, 3) for k, v in s['categories_ms'].items()},
        f"busy={s['busy_ms']:.3f}ms window={s['window_ms']:.3f}ms")
  assert s['available'] and s['source'] == 'device' and s['devices'] == 1
  assert 0 < s['busy_fraction'] <= 1
  assert s['categories_ms']['matmul'] > 0
  assert s['busy_ms_per_step'] == pytest.approx(s['busy_ms'] / 4)
  assert len(s['top_kernels']) == 15
  _assert_adds_up(s)


def test_h100_llama_is_mostly_matmul_and_attention(h100):
  s = h100['h100_llama_4layers_bf16']
  assert s['categories_ms']['attention'] > 0  # cuDNN flash attention kernels
  share = s['categories_share']
  assert share['matmul'] + share['attention'] > 0.5
  assert share['collective'] == 0 and share['moe_dispatch'] == 0  # one GPU, dense model


@pytest.mark.parametrize('name', FIXTURES)
def test_h100_overlapping_kernels_not_double_counted(h100, name):
  # Kernels of one CUDA graph overlap on the stream line: their summed durations exceed the
  # busy time, which the categories add up to.
  s = h100[name]
  pb = jax.profiler.ProfileData.from_file(s['trace_path'])
  summed_ms = sum(e.duration_ns for p in pb.planes if p.name.startswith('/device:')
                  for line in p.lines for e in line.events) / 1e6
  assert s['busy_ms'] < summed_ms


def test_real_cpu_trace(tmp_path):

  @jax.jit
  def step(w, x):
    def loss(w):
      return jnp.sum(jax.nn.softmax(jnp.tanh(x @ w) @ w.T, axis=-1) ** 2)

    return w - 0.1 * jax.grad(loss)(w)

  w, x = jnp.full((128, 128), 0.01), jnp.ones((64, 128))
  step(w, x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      w = step(w, x)
    w.block_until_ready()
  plain = trace.summarize_trace(str(tmp_path), steps=3)
  s = trace.summarize_trace(str(tmp_path), steps=3,
                            hlo_text=step.lower(w, x).compile().as_text())
  for summary in (plain, s):
    assert summary['available'] and summary['source'] == 'host'
    assert 0 < summary['busy_fraction'] <= 1
    _assert_adds_up(summary)
  # The HLO only reclassifies: same intervals, more of them known as matmul.
  assert s['busy_ms'] == plain['busy_ms']
  assert s['categories_ms']['matmul'] > 0
  assert s['categories_ms']['matmul'] >= plain['categories_ms']['matmul']


def test_no_xplane_raises(tmp_path):
  with pytest.raises(FileNotFoundError):
    trace.summarize_trace(str(tmp_path))


def test_trace_without_xla_work_is_unavailable(tmp_path):
  with jax.profiler.trace(str(tmp_path)):
    time.sleep(0.01)
  s = trace.summarize_trace(str(tmp_path))
  assert s['available'] is False
  assert 'no GPU stream kernel events' in s['reason']
  assert s['trace_path'].endswith('.xplane.pb')


def test_newest_xplane_is_used(tmp_path):
  old = tmp_path / 'plugins' / 'profile' / 'a' / 'h.xplane.pb'
  new = tmp_path / 'plugins' / 'profile' / 'b' / 'h.xplane.pb'
  for p in (old, new):
    p.parent.mkdir(parents=True)
    p.write_bytes(b'')
  os.utime(old, (1, 1))
  assert trace.find_xplane(str(tmp_path)) == str(new)
