/**
 * superpie for VS Code: runs `superpie serve` through vscode-languageclient, whose built-in
 * inline-completion feature (registered by default from 10.0.1) turns the server's drafts into ghost
 * text. VS Code's own inline-suggestion commands do the rest: Tab accepts, Alt+] / Alt+[ cycle
 * through the drafts, Ctrl+Right accepts a word. This file adds what the editor does not have:
 * a toggle, the draft picker, the status bar and a restart.
 */
import * as vscode from 'vscode';
import {
    ExecuteCommandRequest,
    InlineCompletionRequest,
    InlineCompletionTriggerKind,
    LanguageClient,
    State,
    WorkDoneProgress,
    WorkDoneProgressCreateRequest,
    type LanguageClientOptions,
    type ServerOptions,
    type WorkDoneProgressBegin,
    type WorkDoneProgressReport,
} from 'vscode-languageclient/node';
import { draftsOf, pickRow, type Draft } from './drafts';
import { configurationItem, needsRestart, serverLaunch, serverOptions, type ServerOptions as SuperpieOptions } from './settings';
import { renderStatus, summarizeStats, type Progress, type ServerState, type StatsSummary } from './status';

const STATS_INTERVAL_MS = 3000;

function settings(): vscode.WorkspaceConfiguration {
    return vscode.workspace.getConfiguration('superpie');
}

function currentServerOptions(): SuperpieOptions {
    const config = settings();
    return serverOptions((key) => config.inspect(key));
}

/** The status bar item and the state it shows. */
class StatusBar implements vscode.Disposable {
    private readonly item = vscode.window.createStatusBarItem('superpie.status', vscode.StatusBarAlignment.Right, 100);
    state: ServerState = 'starting';
    progress = new Map<string | number, Progress>();
    stats: StatsSummary = {};
    error: string | undefined;

    constructor() {
        this.item.name = 'superpie';
        this.item.command = 'superpie.showStats';
        this.update();
        this.item.show();
    }

    update(): void {
        const running = [...this.progress.values()];
        const view = renderStatus({
            state: this.state,
            enabled: settings().get<boolean>('enable', true),
            progress: running.length > 0 ? running[running.length - 1] : undefined,
            stats: this.stats,
            error: this.error,
        });
        this.item.text = view.text;
        this.item.tooltip = view.tooltip;
        this.item.command = this.state === 'error' || this.state === 'stopped' ? 'superpie.restart' : 'superpie.showStats';
    }

    dispose(): void {
        this.item.dispose();
    }
}

class SuperpieClient implements vscode.Disposable {
    private client: LanguageClient | undefined;
    private readonly output = vscode.window.createOutputChannel('superpie', { log: true });
    private readonly status = new StatusBar();
    private lastStatsAt = 0;
    private statsPending = false;

    async start(): Promise<void> {
        const config = settings();
        const launch = serverLaunch({
            command: config.get<string>('server.command', 'superpie'),
            python: config.get<string>('server.python', ''),
            args: config.get<string[]>('server.args', []),
        });
        const env = { ...process.env, ...config.get<Record<string, string>>('server.env', {}) };
        const serverOpts: ServerOptions = { command: launch.command, args: launch.args, options: { env } };
        const clientOptions: LanguageClientOptions = {
            documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
            outputChannel: this.output,
            initializationOptions: currentServerOptions(),
            middleware: {
                provideInlineCompletionItems: async (document, position, context, token, next) => {
                    if (!settings().get<boolean>('enable', true)) {
                        return null;
                    }
                    const result = await next(document, position, context, token);
                    this.refreshStatsSoon();
                    return insertAtCursor(result, position);
                },
                workspace: {
                    configuration: (params) => {
                        const options = currentServerOptions();
                        return params.items.map((item) => configurationItem(item.section, options));
                    },
                },
            },
        };
        this.client = new LanguageClient('superpie', 'superpie', serverOpts, clientOptions);
        this.client.onDidChangeState((event) => {
            this.status.state =
                event.newState === State.Running ? 'ready' : event.newState === State.Starting ? 'starting' : 'stopped';
            if (event.newState !== State.Running) {
                this.status.progress.clear();
            }
            this.status.update();
        });
        this.status.state = 'starting';
        this.status.error = undefined;
        this.status.update();
        try {
            await this.client.start();
        } catch (error) {
            this.status.state = 'error';
            this.status.error = `could not start \`${launch.command} ${launch.args.join(' ')}\`: ${String(error)}`;
            this.status.update();
            this.output.error(this.status.error);
            return;
        }
        this.mirrorProgress(this.client);
        this.refreshStatsSoon();
    }

    /**
     * Server-initiated `$/progress` (model fetch, conversion, load, first encode) goes to the status
     * bar instead of a notification popup: it is frequent at start-up and needs no action.
     */
    private mirrorProgress(client: LanguageClient): void {
        client.onRequest(WorkDoneProgressCreateRequest.type, ({ token }) => {
            const handler = client.onProgress(
                WorkDoneProgress.type,
                token,
                (value: WorkDoneProgressBegin | WorkDoneProgressReport | { kind: 'end'; message?: string }) => {
                    const previous = this.status.progress.get(token);
                    if (value.kind === 'begin') {
                        this.status.progress.set(token, {
                            title: value.title,
                            message: value.message,
                            percentage: value.percentage,
                        });
                    } else if (value.kind === 'report' && previous !== undefined) {
                        this.status.progress.set(token, {
                            title: previous.title,
                            message: value.message ?? previous.message,
                            percentage: value.percentage ?? previous.percentage,
                        });
                    } else if (value.kind === 'end') {
                        this.status.progress.delete(token);
                        handler.dispose();
                        this.refreshStatsSoon();
                    }
                    this.status.update();
                },
            );
        });
    }

    /** Polls `superpie.stats` at most every few seconds, after completions and progress ends. */
    private refreshStatsSoon(): void {
        const now = Date.now();
        if (this.statsPending || now - this.lastStatsAt < STATS_INTERVAL_MS) {
            return;
        }
        this.statsPending = true;
        this.lastStatsAt = now;
        void this.fetchStats()
            .then((stats) => {
                this.status.stats = summarizeStats(stats, this.status.stats);
                this.status.update();
            })
            .catch(() => undefined)
            .finally(() => {
                this.statsPending = false;
            });
    }

    private async fetchStats(): Promise<unknown> {
        if (this.client === undefined || !this.client.isRunning()) {
            throw new Error('the superpie server is not running');
        }
        return this.client.sendRequest(ExecuteCommandRequest.type, { command: 'superpie.stats', arguments: [] });
    }

    async showStats(): Promise<void> {
        try {
            const stats = await this.fetchStats();
            this.status.stats = summarizeStats(stats, this.status.stats);
            this.status.update();
            this.output.info(`superpie.stats: ${JSON.stringify(stats, null, 2)}`);
            this.output.show(true);
        } catch (error) {
            void vscode.window.showErrorMessage(`superpie: ${String(error)}`);
        }
    }

    /** Asks for every draft at the cursor (an Invoked request) and inserts the one picked. */
    async showDrafts(): Promise<void> {
        const editor = vscode.window.activeTextEditor;
        const client = this.client;
        if (editor === undefined || client === undefined || !client.isRunning()) {
            return;
        }
        const position = editor.selection.active;
        const params = client.code2ProtocolConverter.asInlineCompletionParams(editor.document, position, {
            triggerKind: vscode.InlineCompletionTriggerKind.Invoke,
            selectedCompletionInfo: undefined,
        });
        params.context.triggerKind = InlineCompletionTriggerKind.Invoked;
        const version = editor.document.version;
        const result = await vscode.window.withProgress(
            { location: vscode.ProgressLocation.Window, title: 'superpie: drafting' },
            () => client.sendRequest(InlineCompletionRequest.type, params),
        );
        const drafts = draftsOf(result);
        if (drafts.length === 0) {
            void vscode.window.showInformationMessage('superpie: no draft at the cursor.');
            return;
        }
        const rows = drafts.map((draft) => ({ ...pickRow(draft), draft }));
        const picked = await vscode.window.showQuickPick(rows, { title: 'superpie drafts', matchOnDetail: true });
        if (picked === undefined || editor.document.version !== version) {
            return;
        }
        await this.insertDraft(editor, position, picked.draft);
    }

    private async insertDraft(editor: vscode.TextEditor, position: vscode.Position, draft: Draft): Promise<void> {
        const range = draft.range
            ? this.client!.protocol2CodeConverter.asRange(draft.range)
            : new vscode.Range(position, position);
        await editor.edit((edit) => edit.replace(range, draft.text));
    }

    /**
     * Launch settings restart the server. The others reach it without help: the server registers for
     * didChangeConfiguration on `superpie` and then pulls workspace/configuration, which the
     * middleware above answers with the explicitly set options.
     */
    onConfigurationChanged(event: vscode.ConfigurationChangeEvent): void {
        if (!event.affectsConfiguration('superpie')) {
            return;
        }
        this.status.update();
        if (needsRestart((section) => event.affectsConfiguration(section))) {
            void this.restart();
        }
    }

    async restart(): Promise<void> {
        await this.stop();
        await this.start();
    }

    async stop(): Promise<void> {
        const client = this.client;
        this.client = undefined;
        if (client !== undefined) {
            try {
                await client.dispose(2000);
            } catch (error) {
                this.output.warn(`stopping the server: ${String(error)}`);
            }
        }
    }

    dispose(): void {
        void this.stop();
        this.status.dispose();
        this.output.dispose();
    }
}

/**
 * The server's drafts start at the cursor. An item without a `range` would get VS Code's default, the
 * word before the cursor to the end of the line, and VS Code would then hide the draft because it does
 * not start with that word. So an item without a range inserts at the cursor.
 */
function insertAtCursor(
    result: vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined,
    position: vscode.Position,
): vscode.InlineCompletionItem[] | vscode.InlineCompletionList | null | undefined {
    const items = Array.isArray(result) ? result : result?.items;
    for (const item of items ?? []) {
        item.range ??= new vscode.Range(position, position);
    }
    return result;
}

let superpie: SuperpieClient | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
    const instance = new SuperpieClient();
    superpie = instance;
    context.subscriptions.push(
        instance,
        vscode.workspace.onDidChangeConfiguration((event) => instance.onConfigurationChanged(event)),
        vscode.commands.registerCommand('superpie.toggle', async () => {
            const enabled = settings().get<boolean>('enable', true);
            await settings().update('enable', !enabled, vscode.ConfigurationTarget.Global);
            if (enabled) {
                await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
            }
        }),
        vscode.commands.registerCommand('superpie.showDrafts', () => instance.showDrafts()),
        vscode.commands.registerCommand('superpie.showStats', () => instance.showStats()),
        vscode.commands.registerCommand('superpie.restart', () => instance.restart()),
        vscode.commands.registerCommand('superpie.acceptWord', () =>
            vscode.commands.executeCommand('editor.action.inlineSuggest.acceptNextWord'),
        ),
        vscode.commands.registerCommand('superpie.acceptLine', () =>
            vscode.commands.executeCommand('editor.action.inlineSuggest.acceptNextLine'),
        ),
    );
    await instance.start();
}

export async function deactivate(): Promise<void> {
    await superpie?.stop();
}
