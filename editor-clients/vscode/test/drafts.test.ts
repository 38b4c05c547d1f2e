import assert from 'node:assert/strict';
import { test } from 'node:test';
import { draftsOf, pickRow } from '../src/drafts';

test('drafts keep the server order and are ranked from 1', () => {
    const drafts = draftsOf([{ insertText: 'a + b' }, { insertText: 'a - b' }]);
    assert.deepEqual(
        drafts.map((d) => [d.rank, d.text]),
        [
            [1, 'a + b'],
            [2, 'a - b'],
        ],
    );
});

test('a list answer, snippet values and ranges are understood', () => {
    const range = { start: { line: 1, character: 4 }, end: { line: 1, character: 6 } };
    const drafts = draftsOf({ items: [{ insertText: { kind: 'snippet', value: 'x)' }, range }] });
    assert.deepEqual(drafts, [{ rank: 1, text: 'x)', range }]);
});

test('empty and duplicate drafts are dropped', () => {
    const drafts = draftsOf([{ insertText: '' }, { insertText: 'same' }, { insertText: 'same' }, { insertText: 'other' }]);
    assert.deepEqual(
        drafts.map((d) => [d.rank, d.text]),
        [
            [1, 'same'],
            [2, 'other'],
        ],
    );
});

test('no answer means no drafts', () => {
    assert.deepEqual(draftsOf(null), []);
    assert.deepEqual(draftsOf(undefined), []);
});

test('a multi-line draft shows its first line and its line count', () => {
    const row = pickRow({ rank: 2, text: 'if x:\n    return y\n' });
    assert.equal(row.label, 'if x:');
    assert.equal(row.description, '#2 · 3 lines');
    assert.equal(row.detail, 'return y ⏎');
});

test('a long first line is cut for the label, and a leading newline gets a visible label', () => {
    assert.equal(pickRow({ rank: 1, text: 'x'.repeat(200) }).label.length, 80);
    assert.match(pickRow({ rank: 1, text: '\n  pass' }).label, /new line/);
});
