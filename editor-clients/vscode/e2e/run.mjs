// End-to-end test of the packaged extension in a real VS Code: code-server on loopback, driven in
// Debian's Chromium by playwright-core. Installs the .vsix, opens a file (Python unless --file says otherwise), types at its end, waits
// for superpie's ghost text to settle, presses Tab, saves, and prints one JSON line with what it saw.
// tests/test_vscode.py runs it and checks the file on disk. Run it with Node 24 (editor-clients/toolchain).
//
// node run.mjs --vsix X.vsix --python .venv/bin/python --model tiny.gguf --cache DIR --work DIR
//              [--file NAME] [--sample TEXT] [--typed TEXT] [--settings JSON] [--expect TEXT]
//              [--screenshot OUT.png] [--chromium /usr/bin/chromium] [--timeout-s 120]
//
// --file: the name of the file to open (its extension gives VS Code the language); --sample: its text; --typed: what to type on its last (empty) line; --settings: the
// superpie.* settings the server gets (camelCase keys); --expect: the ghost text to wait for (the test
// computes the server's draft in-process: what a random-weight model says depends on the CPU).
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
const codeServer = join(here, 'node_modules', 'code-server', 'out', 'node', 'entry.js');

const { values: args } = parseArgs({
    options: {
        vsix: { type: 'string' },
        python: { type: 'string' },
        model: { type: 'string' },
        cache: { type: 'string' },
        work: { type: 'string' },
        screenshot: { type: 'string' },
        chromium: { type: 'string', default: '/usr/bin/chromium' },
        'timeout-s': { type: 'string', default: '120' },
        file: { type: 'string', default: 'sample.py' },
        sample: { type: 'string', default: 'def add(a, b):\n    return a + b\n\n\ndef scale(values, factor):\n    result = []\n' },
        typed: { type: 'string', default: '    return res' },
        // One line (scope single): the ghost text is then one inline decoration whose text the test can compare.
        settings: { type: 'string', default: JSON.stringify({ maxTokens: 12, scope: 'single' }) },
        expect: { type: 'string' },
    },
});
for (const name of ['vsix', 'python', 'model', 'cache', 'work']) {
    if (!args[name]) {
        throw new Error(`--${name} is required`);
    }
}
if (!args.sample.endsWith('\n') || args.typed === '' || args.typed.includes('\n')) {
    throw new Error('--sample must end with a line break and --typed must be one non-empty line');
}
const serverSettings = Object.fromEntries(
    Object.entries(JSON.parse(args.settings)).map(([key, value]) => [`superpie.${key}`, value]),
);
const deadline = Date.now() + Number(args['timeout-s']) * 1000;
const remaining = () => Math.max(1000, deadline - Date.now());
const t0 = Date.now();
const timings = {};
const mark = (name) => {
    timings[name] = (Date.now() - t0) / 1000;
};

const userData = join(args.work, 'user-data');
const extensions = join(args.work, 'extensions');
const workspace = join(args.work, 'workspace');
const serverLog = join(args.work, 'superpie-server.log');
for (const dir of [join(userData, 'User'), extensions, workspace]) {
    mkdirSync(dir, { recursive: true });
}
const source = join(workspace, args.file);
writeFileSync(source, args.sample);
writeFileSync(
    join(userData, 'User', 'settings.json'),
    JSON.stringify(
        {
            'security.workspace.trust.enabled': false,
            'workbench.startupEditor': 'none',
            'workbench.tips.enabled': false,
            'workbench.welcomePage.walkthroughs.openOnInstall': false,
            'telemetry.telemetryLevel': 'off',
            'update.mode': 'none',
            'extensions.autoCheckUpdates': false,
            'extensions.autoUpdate': false,
            'extensions.ignoreRecommendations': true,
            'workbench.secondarySideBar.defaultVisibility': 'hidden',
            // Keep the suggest widget out of the way: Tab must reach the inline suggestion.
            'editor.quickSuggestions': { other: false, comments: false, strings: false },
            'editor.suggestOnTriggerCharacters': false,
            'editor.inlineSuggest.enabled': true,
            // The line holds exactly what was typed (no closing bracket or quote added), and no hover under
            // the mouse asks the server for drafts of its own while the test types.
            'editor.autoClosingBrackets': 'never',
            'editor.autoClosingQuotes': 'never',
            'editor.hover.enabled': false,
            'superpie.server.python': args.python,
            'superpie.server.args': ['--model', args.model, '--no-persist', '--log-file', serverLog],
            'superpie.server.env': { SUPERPIE_CACHE: args.cache },
            ...serverSettings,
            'superpie.trace.server': 'messages',
        },
        null,
        2,
    ),
);

// No traffic off this machine: the extension gallery points at a closed loopback port.
const offline = {
    ...process.env,
    XDG_DATA_HOME: join(args.work, 'xdg-data'),
    EXTENSIONS_GALLERY: JSON.stringify({ serviceUrl: 'http://127.0.0.1:9/gallery', itemUrl: 'http://127.0.0.1:9/item' }),
};

function run(command, commandArgs) {
    const result = spawnSync(command, commandArgs, { encoding: 'utf8', timeout: remaining(), env: offline });
    if (result.status !== 0) {
        throw new Error(`${command} ${commandArgs.join(' ')} failed:\n${result.stdout}\n${result.stderr}`);
    }
    return result.stdout;
}

const common = ['--user-data-dir', userData, '--extensions-dir', extensions, '--config', join(args.work, 'code-server.yaml')];
run(process.execPath, [codeServer, ...common, '--install-extension', args.vsix, '--force']);
const installed = run(process.execPath, [codeServer, ...common, '--list-extensions', '--show-versions']);
if (!installed.includes('superpie.superpie@')) {
    throw new Error(`the .vsix did not install: ${installed}`);
}
mark('installed');

/**
 * Editor text as it is in the file: Monaco draws blanks as no-break spaces and control characters as
 * Unicode control pictures (U+2400..U+241F, U+2421); the tiny model's gibberish drafts contain some.
 */
function fromScreen(text) {
    return text
        .replace(/\u00a0/g, ' ')
        .replace(/[\u2400-\u241f]/g, (c) => String.fromCharCode(c.charCodeAt(0) - 0x2400))
        .replace(/\u2421/g, '\u007f');
}

async function freePort() {
    return new Promise((resolve, reject) => {
        const server = createServer();
        server.once('error', reject);
        server.listen(0, '127.0.0.1', () => {
            const { port } = server.address();
            server.close(() => resolve(port));
        });
    });
}

const port = await freePort();
const codeServerProcess = spawn(
    process.execPath,
    [
        codeServer,
        ...common,
        '--bind-addr', `127.0.0.1:${port}`,
        '--auth', 'none',
        '--disable-telemetry',
        '--disable-update-check',
        '--disable-workspace-trust',
        '--disable-getting-started-override',
        '--ignore-last-opened',
        workspace,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: offline },
);
let codeServerOutput = '';
codeServerProcess.stdout.on('data', (chunk) => (codeServerOutput += chunk));
codeServerProcess.stderr.on('data', (chunk) => (codeServerOutput += chunk));
await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`code-server did not start:\n${codeServerOutput}`)), remaining());
    const check = setInterval(() => {
        if (codeServerOutput.includes('HTTP server listening')) {
            clearInterval(check);
            clearTimeout(timer);
            resolve();
        }
    }, 100);
    codeServerProcess.once('exit', (code) => reject(new Error(`code-server exited (${code}):\n${codeServerOutput}`)));
});
mark('code-server');

const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--disable-background-networking',
        '--disable-component-update',
        '--no-first-run',
    ],
});
const result = { ok: false, timings };
try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 560 } });
    page.setDefaultTimeout(60000);
    await page.goto(`http://127.0.0.1:${port}/?folder=${encodeURIComponent(workspace)}`);
    await page.waitForSelector('.monaco-workbench', { timeout: remaining() });
    mark('workbench');

    // Open the file through quick open; Enter only once its row is there.
    const modifier = 'Control';
    await page.locator('.monaco-workbench').click({ position: { x: 600, y: 300 } });
    await page.keyboard.press(`${modifier}+P`);
    await page.waitForSelector('.quick-input-widget input', { state: 'visible' });
    await page.keyboard.type(args.file);
    await page.waitForSelector(`.quick-input-list .monaco-list-row[aria-label*=${JSON.stringify(args.file)}]`, {
        timeout: remaining(),
    });
    await page.keyboard.press('Enter');
    const editor = page.locator('.editor-instance .monaco-editor').first();
    await editor.waitFor({ timeout: remaining() });
    const lastLine = args.sample.trimEnd().split('\n').at(-1).trim();
    await page.waitForSelector(`.view-lines:has-text(${JSON.stringify(lastLine.split(/\s+/)[0])})`, { timeout: remaining() });
    mark('file-open');

    // The extension's status bar item turns to the sparkle once the server runs and its model is loaded.
    await page.waitForSelector('.statusbar-item:has(.codicon-sparkle)', { timeout: remaining() });
    mark('server-ready');

    await editor.locator('.view-lines').click();
    await page.keyboard.press(`${modifier}+End`);
    const typed = args.typed;
    await page.keyboard.type(typed, { delay: 30 });
    const ghostParts = editor.locator('.ghost-text-decoration');
    await ghostParts.first().waitFor({ state: 'visible', timeout: remaining() });
    mark('ghost-text');
    // The inline part of the ghost text (further lines, if any, are separate blocks).
    const readGhost = async () => fromScreen((await ghostParts.allTextContents()).join(''));
    // Read it once it has settled: the same on consecutive reads and, with --expect, the server's draft for
    // the text as typed. What shows first may be the rest of an earlier keystroke's draft, typed through,
    // until the answer for the whole text replaces it.
    let ghostText = await readGhost();
    let reads = ghostText === '' ? 0 : 1; // consecutive reads that found this same, non-empty, text
    while (reads < 3 || (args.expect !== undefined && ghostText !== args.expect)) {
        if (Date.now() > deadline) {
            const wanted = args.expect !== undefined ? ` on ${JSON.stringify(args.expect)}` : '';
            throw new Error(`the ghost text did not settle${wanted}: it shows ${JSON.stringify(ghostText)}`);
        }
        await page.waitForTimeout(100);
        const now = await readGhost();
        reads = now === '' ? 0 : now === ghostText ? reads + 1 : 1;
        ghostText = now;
    }
    mark('ghost-settled');
    const ghostLines = await editor.locator('.ghost-text').count();
    if (args.screenshot) {
        await page.screenshot({ path: args.screenshot });
    }
    // The text of the typed line, the file's last: ghost text is drawn inside the line, so it is left out.
    const lineText = async () =>
        fromScreen(
            await editor.evaluate((root) => {
                const lines = [...root.querySelectorAll('.view-line')];
                const line = lines.sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top)).at(-1);
                if (!line) {
                    return '';
                }
                const copy = line.cloneNode(true);
                copy.querySelectorAll('[class*="ghost-text"]').forEach((ghostPart) => ghostPart.remove());
                return copy.textContent;
            }),
        );
    const beforeTab = await lineText();
    if (beforeTab !== typed) {
        throw new Error(`before Tab the line is ${JSON.stringify(beforeTab)}, not what was typed`);
    }
    await page.keyboard.press('Tab');
    let afterTab = typed;
    while ((afterTab = await lineText()) === typed && Date.now() < deadline) {
        await page.waitForTimeout(50);
    }
    if (afterTab === typed) {
        throw new Error(`Tab did not accept the ghost text ${JSON.stringify(ghostText)}`);
    }
    await page.keyboard.press(`${modifier}+S`);
    // Wait for the save to land on disk.
    let onDisk = readFileSync(source, 'utf8');
    while (!onDisk.includes(afterTab) && Date.now() < deadline) {
        await page.waitForTimeout(50);
        onDisk = readFileSync(source, 'utf8');
    }
    if (!onDisk.includes(afterTab)) {
        throw new Error(`Ctrl+S did not save the accepted line ${JSON.stringify(afterTab)}:\n${onDisk}`);
    }
    mark('accepted');
    Object.assign(result, { ok: true, typed, ghostText, ghostLines, afterTab, onDisk, statusBar: await page.locator('.statusbar-item:has(.codicon-sparkle)').first().getAttribute('aria-label') });
} catch (error) {
    result.error = String(error && error.stack ? error.stack : error);
    try {
        const pages = browser.contexts().flatMap((context) => context.pages());
        if (pages[0] && args.screenshot) {
            await pages[0].screenshot({ path: args.screenshot.replace(/\.png$/, '-failure.png') });
        }
    } catch {
        // the failure itself is what matters
    }
} finally {
    await browser.close();
    codeServerProcess.kill('SIGTERM');
}
try {
    const log = readFileSync(serverLog, 'utf8').split('\n');
    result.serverLog = log.slice(-15).join('\n');
    // Which syntax rules the server chose for each document: the languageId VS Code sent decides.
    result.syntaxRules = log.filter((line) => line.includes(': syntax rules ')).map((line) => line.split(': ').slice(-2).join(': '));
} catch {
    result.serverLog = '(no server log)';
}
process.stdout.write(`${JSON.stringify(result)}\n`);
process.exit(result.ok ? 0 : 1);
