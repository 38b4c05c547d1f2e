// Bundles the extension into one CommonJS file (VS Code loads extensions with require), and the unit
// tests into out/test for `node --test`. Flags: --production (minify, no source map), --watch, --tests.
import * as esbuild from 'esbuild';
import { readdirSync } from 'node:fs';

const production = process.argv.includes('--production');
const watch = process.argv.includes('--watch');
const tests = process.argv.includes('--tests');

const common = {
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    sourcemap: production ? false : 'linked',
    logLevel: 'warning',
};

const options = tests
    ? {
          ...common,
          entryPoints: readdirSync('test')
              .filter((name) => name.endsWith('.test.ts'))
              .map((name) => `test/${name}`),
          outdir: 'out/test',
          // The glue under test is pure: a test that pulls in `vscode` fails to bundle, on purpose.
      }
    : {
          ...common,
          entryPoints: ['src/extension.ts'],
          outfile: 'dist/extension.js',
          external: ['vscode'],
          minify: production,
      };

if (watch) {
    const context = await esbuild.context(options);
    await context.watch();
} else {
    await esbuild.build(options);
}
