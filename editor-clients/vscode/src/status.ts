/**
 * What the status bar item says: the server's state, a running `$/progress`, and cache reuse from
 * `superpie.stats`. Pure, so the wording is unit-tested without VS Code.
 */

export type ServerState = 'starting' | 'ready' | 'stopped' | 'error';

export interface Progress {
    title: string;
    message?: string;
    /** 0..100 when the server reports it. */
    percentage?: number;
}

/** The few numbers the status bar shows, read out of the server's `superpie.stats` answer. */
export interface StatsSummary {
    /** Fraction 0..1 of prompt tokens answered from the cache instead of being encoded. */
    reuse?: number;
    model?: string;
    /** Median latency of a completion, in milliseconds. */
    latencyP50Ms?: number;
    /** The server's model state: "not loaded", "loading", "ready" or "failed". */
    modelState?: string;
    modelError?: string;
}

export interface StatusView {
    text: string;
    tooltip: string;
}

export interface StatusInput {
    state: ServerState;
    enabled: boolean;
    progress?: Progress;
    stats?: StatsSummary;
    error?: string;
}

function percent(fraction: number): string {
    return `${Math.round(fraction * 100)}%`;
}

/** Renders the status bar item; codicons (`$(name)`) mark the state at a glance. */
export function renderStatus(input: StatusInput): StatusView {
    const lines: string[] = [];
    let text: string;
    if (input.state === 'error') {
        text = '$(error) superpie';
        lines.push(`superpie: ${input.error ?? 'the server failed'}`, 'Click to restart.');
        return { text, tooltip: lines.join('\n') };
    }
    if (input.state === 'ready' && input.stats?.modelState === 'failed') {
        const reason = input.stats.modelError ?? 'unknown error';
        return {
            text: '$(warning) superpie',
            tooltip: `superpie: the model did not load (${reason}).\nFix the superpie.model setting; click for statistics.`,
        };
    }
    if (input.state === 'stopped') {
        return { text: '$(debug-stop) superpie', tooltip: 'superpie: the server is stopped. Click to restart.' };
    }
    if (input.progress !== undefined) {
        const { title, message, percentage } = input.progress;
        const amount = percentage !== undefined ? ` ${Math.round(percentage)}%` : '';
        text = `$(sync~spin) superpie${amount}`;
        lines.push(`superpie: ${title}${message ? ` (${message})` : ''}`);
    } else if (input.state === 'starting' || input.stats?.modelState === 'loading') {
        text = '$(sync~spin) superpie';
        lines.push(input.state === 'starting' ? 'superpie: starting the server' : 'superpie: loading the model');
    } else if (!input.enabled) {
        text = '$(circle-slash) superpie';
        lines.push('superpie: inline completions are off');
    } else {
        const reuse = input.stats?.reuse !== undefined ? ` ${percent(input.stats.reuse)}` : '';
        text = `$(sparkle) superpie${reuse}`;
        lines.push('superpie: ready');
    }
    if (input.stats?.model) {
        lines.push(`model: ${input.stats.model}`);
    }
    if (input.stats?.reuse !== undefined) {
        lines.push(`cache reuse: ${percent(input.stats.reuse)} of prompt tokens`);
    }
    if (input.stats?.latencyP50Ms !== undefined) {
        lines.push(`latency p50: ${Math.round(input.stats.latencyP50Ms)} ms`);
    }
    lines.push(input.enabled ? 'Click for statistics.' : 'Click for statistics; `superpie: Toggle` turns them on.');
    return { text, tooltip: lines.join('\n') };
}

function isRecord(value: unknown): value is Record<string, unknown> {
    return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function finiteNumber(value: unknown): number | undefined {
    return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

/**
 * Reads the status-bar numbers out of a `superpie.stats` answer: `{server: {model_state, model_error,
 * settings, latency: {inline: {p50_ms}}}, cache: {model, reuse_ratio, latency_p50_ms} | null}` (cache
 * is null until the model is loaded, and while it decodes: then the reuse of `previous` is kept). Unknown
 * shapes give an empty summary rather than an exception: the status bar must never break the editor.
 */
export function summarizeStats(stats: unknown, previous: StatsSummary = {}): StatsSummary {
    if (!isRecord(stats)) {
        return {};
    }
    const summary: StatsSummary = {};
    const server = isRecord(stats.server) ? stats.server : {};
    const cache = isRecord(stats.cache) ? stats.cache : {};
    const busy = stats.cache === null && server.model_state === 'ready';
    const reuse = busy ? previous.reuse : finiteNumber(cache.reuse_ratio);
    if (reuse !== undefined && reuse >= 0 && reuse <= 1) {
        summary.reuse = reuse;
    }
    const settings = isRecord(server.settings) ? server.settings : {};
    const model = cache.model ?? settings.model;
    if (typeof model === 'string' && model.length > 0) {
        summary.model = model;
    }
    const latency = isRecord(server.latency) && isRecord(server.latency.inline) ? server.latency.inline : {};
    const p50 = finiteNumber(cache.latency_p50_ms ?? latency.p50_ms);
    if (p50 !== undefined) {
        summary.latencyP50Ms = p50;
    }
    if (typeof server.model_state === 'string') {
        summary.modelState = server.model_state;
    }
    if (typeof server.model_error === 'string' && server.model_error.length > 0) {
        summary.modelError = server.model_error;
    }
    return summary;
}
