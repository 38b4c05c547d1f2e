/**
 * VS Code settings -> what the server is told, and how it is launched.
 *
 * Pure (no `vscode` import) so the unit tests run under plain Node. Only the settings the user set
 * explicitly are sent: the server's own typed defaults stay the single source of truth, and the
 * client-only keys (`enable`, `server.*`, `trace.*`) never reach it as "unknown option" warnings.
 */

/** The `superpie.*` keys the server understands (lsp_server/options.py, camelCase on the wire). */
export const SERVER_OPTION_KEYS = [
    'model',
    'quantization',
    'drafts',
    'automaticDrafts',
    'draftMethod',
    'maxTokens',
    'scope',
    'speculative',
    'layout',
    'cacheMode',
    'memoryBudgetMb',
    'persistMaxMb',
    'idleRows',
    'refresh',
    'prefetch',
    'crossFileContext',
    'crossFileTokens',
    'logLevel',
] as const;

export type ServerOptionKey = (typeof SERVER_OPTION_KEYS)[number];
export type ServerOptions = Partial<Record<ServerOptionKey, unknown>>;

/** The layers of one setting, shaped like `WorkspaceConfiguration.inspect()`'s answer. */
export interface SettingLayers {
    defaultValue?: unknown;
    globalValue?: unknown;
    workspaceValue?: unknown;
    workspaceFolderValue?: unknown;
}

export type InspectSetting = (key: string) => SettingLayers | undefined;

/** The value the user set (the most specific layer wins), or undefined when only the default applies. */
export function explicitValue(layers: SettingLayers | undefined): unknown {
    if (layers === undefined) {
        return undefined;
    }
    for (const value of [layers.workspaceFolderValue, layers.workspaceValue, layers.globalValue]) {
        if (value !== undefined) {
            return value;
        }
    }
    return undefined;
}

/** initializationOptions / workspace/configuration answer: the explicitly set server options only. */
export function serverOptions(inspect: InspectSetting): ServerOptions {
    const options: ServerOptions = {};
    for (const key of SERVER_OPTION_KEYS) {
        const value = explicitValue(inspect(key));
        if (value !== undefined) {
            options[key] = value;
        }
    }
    return options;
}

/**
 * Answers one `workspace/configuration` item. `section` is what the server asked for: `superpie`
 * (the whole object) or `superpie.maxTokens` (one value); anything else is not ours (null).
 */
export function configurationItem(section: string | undefined, options: ServerOptions): unknown {
    if (section === 'superpie') {
        return options;
    }
    if (section !== undefined && section.startsWith('superpie.')) {
        const key = section.slice('superpie.'.length);
        return (SERVER_OPTION_KEYS as readonly string[]).includes(key)
            ? (options[key as ServerOptionKey] ?? null)
            : null;
    }
    return null;
}

export interface LaunchSettings {
    command: string;
    python: string;
    args: readonly string[];
}

export interface Launch {
    command: string;
    args: string[];
}

/** `superpie serve ARGS`, or `PYTHON -m lsp_server.cli serve ARGS` when a Python is configured. */
export function serverLaunch(settings: LaunchSettings): Launch {
    const python = settings.python.trim();
    const extra = settings.args.filter((arg) => arg.length > 0);
    if (python.length > 0) {
        return { command: python, args: ['-m', 'lsp_server.cli', 'serve', ...extra] };
    }
    const command = settings.command.trim() || 'superpie';
    return { command, args: ['serve', ...extra] };
}

/** True when a configuration change touches a key that needs a server restart to take effect. */
export function needsRestart(affects: (section: string) => boolean): boolean {
    return ['superpie.server'].some((section) => affects(section));
}
