import assert from 'node:assert/strict';
import { test } from 'node:test';
import { renderStatus, summarizeStats } from '../src/status';

test('a ready server shows the cache reuse in the status bar', () => {
    const view = renderStatus({ state: 'ready', enabled: true, stats: { reuse: 0.874, model: 'tiny' } });
    assert.equal(view.text, '$(sparkle) superpie 87%');
    assert.match(view.tooltip, /cache reuse: 87% of prompt tokens/);
    assert.match(view.tooltip, /model: tiny/);
});

test('progress wins over the ready state and shows its percentage', () => {
    const view = renderStatus({
        state: 'ready',
        enabled: true,
        progress: { title: 'Converting model', message: 'layer 3/24', percentage: 12.4 },
    });
    assert.equal(view.text, '$(sync~spin) superpie 12%');
    assert.match(view.tooltip, /Converting model \(layer 3\/24\)/);
});

test('a disabled client says so', () => {
    const view = renderStatus({ state: 'ready', enabled: false });
    assert.equal(view.text, '$(circle-slash) superpie');
    assert.match(view.tooltip, /off/);
});

test('a failed start shows the error and offers a restart', () => {
    const view = renderStatus({ state: 'error', enabled: true, error: 'spawn superpie ENOENT' });
    assert.equal(view.text, '$(error) superpie');
    assert.match(view.tooltip, /ENOENT/);
    assert.match(view.tooltip, /restart/);
});

test('the answer of superpie.stats is summarized for the status bar', () => {
    const stats = {
        server: {
            model_state: 'ready',
            model_error: null,
            settings: { model: '/tmp/tiny.gguf' },
            latency: { inline: { n: 3, p50_ms: 12.5, p99_ms: 30 } },
        },
        cache: { model: 'tiny', reuse_ratio: 0.9231, latency_p50_ms: 41.5 },
    };
    assert.deepEqual(summarizeStats(stats), { reuse: 0.9231, model: 'tiny', latencyP50Ms: 41.5, modelState: 'ready' });
});

test('before the model is loaded the cache is null and the server part still counts', () => {
    const stats = {
        server: { model_state: 'loading', settings: { model: 'qwen' }, latency: { inline: { p50_ms: 7 } } },
        cache: null,
    };
    assert.deepEqual(summarizeStats(stats), { model: 'qwen', latencyP50Ms: 7, modelState: 'loading' });
    const view = renderStatus({ state: 'ready', enabled: true, stats: summarizeStats(stats) });
    assert.equal(view.text, '$(sync~spin) superpie');
    assert.match(view.tooltip, /loading the model/);
});

test('while the model decodes the cache part is null and the last reuse stays shown', () => {
    const busy = { server: { model_state: 'ready', settings: { model: 'qwen' } }, cache: null };
    assert.deepEqual(summarizeStats(busy, { reuse: 0.5, model: 'qwen' }), { reuse: 0.5, model: 'qwen', modelState: 'ready' });
    assert.deepEqual(summarizeStats(busy), { model: 'qwen', modelState: 'ready' });
});

test('a model that failed to load shows a warning with the reason', () => {
    const stats = summarizeStats({ server: { model_state: 'failed', model_error: 'FileNotFoundError: x.gguf' } });
    const view = renderStatus({ state: 'ready', enabled: true, stats });
    assert.equal(view.text, '$(warning) superpie');
    assert.match(view.tooltip, /x\.gguf/);
});

test('malformed stats give an empty summary instead of throwing', () => {
    assert.deepEqual(summarizeStats(null), {});
    assert.deepEqual(summarizeStats('x'), {});
    assert.deepEqual(summarizeStats({ cache: { reuse_ratio: 7 } }), {});
    assert.deepEqual(summarizeStats({ cache: { reuse_ratio: Number.NaN }, server: 3 }), {});
});
