import assert from 'node:assert/strict';
import { test } from 'node:test';
import { configurationItem, explicitValue, needsRestart, serverLaunch, serverOptions, type SettingLayers } from '../src/settings';

function inspector(layers: Record<string, SettingLayers>) {
    return (key: string) => layers[key] ?? { defaultValue: 'from-package-json' };
}

test('only explicitly set server options are sent, so the server keeps its own defaults', () => {
    const options = serverOptions(
        inspector({
            drafts: { defaultValue: 3, globalValue: 5 },
            maxTokens: { defaultValue: 64 },
            cacheMode: { defaultValue: 'pie', workspaceValue: 'full' },
        }),
    );
    assert.deepEqual(options, { drafts: 5, cacheMode: 'full' });
});

test('draftMethod is a server option: sent when the user sets it', () => {
    const options = serverOptions(inspector({ draftMethod: { defaultValue: 'beam', globalValue: 'superposed' } }));
    assert.deepEqual(options, { draftMethod: 'superposed' });
    assert.equal(configurationItem('superpie.draftMethod', options), 'superposed');
});

test('client-only settings never reach the server', () => {
    const options = serverOptions(
        inspector({ enable: { globalValue: false }, 'server.command': { globalValue: '/x/superpie' } }),
    );
    assert.deepEqual(options, {});
});

test('the most specific settings layer wins', () => {
    assert.equal(explicitValue({ globalValue: 1, workspaceValue: 2, workspaceFolderValue: 3 }), 3);
    assert.equal(explicitValue({ globalValue: 1, workspaceValue: 2 }), 2);
    assert.equal(explicitValue({ defaultValue: 9 }), undefined);
    assert.equal(explicitValue(undefined), undefined);
});

test('a false or zero setting counts as set', () => {
    const options = serverOptions(inspector({ speculative: { defaultValue: true, globalValue: false } }));
    assert.deepEqual(options, { speculative: false });
});

test('workspace/configuration answers the whole section, one key, or null for other sections', () => {
    const options = { drafts: 4 };
    assert.deepEqual(configurationItem('superpie', options), { drafts: 4 });
    assert.equal(configurationItem('superpie.drafts', options), 4);
    assert.equal(configurationItem('superpie.maxTokens', options), null);
    assert.equal(configurationItem('superpie.enable', options), null);
    assert.equal(configurationItem('editor', options), null);
    assert.equal(configurationItem(undefined, options), null);
});

test('the server runs as `superpie serve` with extra options after the subcommand', () => {
    assert.deepEqual(serverLaunch({ command: 'superpie', python: '', args: ['--log-file', '/tmp/l'] }), {
        command: 'superpie',
        args: ['serve', '--log-file', '/tmp/l'],
    });
});

test('a configured Python runs the server module instead of the command', () => {
    assert.deepEqual(serverLaunch({ command: 'superpie', python: ' /v/bin/python ', args: [] }), {
        command: '/v/bin/python',
        args: ['-m', 'lsp_server.cli', 'serve'],
    });
});

test('an empty command falls back to superpie on PATH', () => {
    assert.equal(serverLaunch({ command: '  ', python: '', args: [''] }).command, 'superpie');
    assert.deepEqual(serverLaunch({ command: '  ', python: '', args: [''] }).args, ['serve']);
});

test('only launch settings need a restart; model options go through didChangeConfiguration', () => {
    assert.equal(needsRestart((section) => section === 'superpie.server'), true);
    assert.equal(needsRestart((section) => section === 'superpie.model'), false);
});
