/**
 * The drafts of one `textDocument/inlineCompletion` answer, as the "Show Drafts" picker lists them.
 * Pure: works on the protocol types, not on VS Code's.
 */
import type { InlineCompletionItem, InlineCompletionList, Range } from 'vscode-languageclient';

export interface Draft {
    /** 1-based rank: the server sends the best draft first. */
    rank: number;
    text: string;
    /** The text the draft replaces (after the cursor, on one line); absent for a plain insertion. */
    range?: Range;
}

/** Snippet-valued items (`StringValue`) are shown and inserted as their plain text. */
function insertTextOf(item: InlineCompletionItem): string {
    return typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
}

/** Every non-empty draft, best first, without duplicates (the same text twice is one choice). */
export function draftsOf(result: InlineCompletionItem[] | InlineCompletionList | null | undefined): Draft[] {
    if (result === null || result === undefined) {
        return [];
    }
    const items = Array.isArray(result) ? result : result.items;
    const seen = new Set<string>();
    const drafts: Draft[] = [];
    for (const item of items) {
        const text = insertTextOf(item);
        if (text.length === 0 || seen.has(text)) {
            continue;
        }
        seen.add(text);
        drafts.push({ rank: drafts.length + 1, text, range: item.range });
    }
    return drafts;
}

export interface PickRow {
    label: string;
    description: string;
    detail?: string;
}

const LABEL_WIDTH = 80;

/** One picker row: the first line as label, the line count as description, the rest as detail. */
export function pickRow(draft: Draft): PickRow {
    const lines = draft.text.split(/\r?\n/);
    const first = lines[0].length > LABEL_WIDTH ? `${lines[0].slice(0, LABEL_WIDTH - 1)}…` : lines[0];
    const label = first.trim().length > 0 ? first : '⏎ (starts with a new line)';
    const description = `#${draft.rank}${lines.length > 1 ? ` · ${lines.length} lines` : ''}`;
    const rest = lines.slice(1).join(' ⏎ ').trim();
    return rest.length > 0 ? { label, description, detail: rest } : { label, description };
}
