# ruff: noqa: E501  -- fixture lines are kept whole so each reads as one record
"""Regenerate the fixtures marked "ours" in SOURCES.md (run from the repo root).

    python tests/data/lab/make_ours.py

Kept so the byte-level details (Windows-1258 combining marks, Latin-1, CRLF, MLLP,
E1381 frames and checksums) can be reproduced and reviewed instead of hand-edited.
"""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from tests.ingest.labs._framing import frame_capture, with_long_comment  # noqa: E402


def cp1258(text: str) -> bytes:
    """Encode as Windows-1258 the way Vietnamese Windows software does.

    cp1258 has precomposed letters with one diacritic (ê, ơ, ư, â, ă) but writes
    tone marks as combining characters: "ễ" becomes "ê" + U+0303 (0xDE).
    """
    out = bytearray()
    for char in unicodedata.normalize("NFC", text):
        try:
            out += char.encode("cp1258")
            continue
        except UnicodeEncodeError:
            pass
        decomposed = unicodedata.normalize("NFD", char)
        # Keep one mark apart (the tone) and the rest precomposed: "ệ" is NFD
        # e + dot below + circumflex, written as "ê" + U+0323.
        for i in range(len(decomposed) - 1, 0, -1):
            base = unicodedata.normalize("NFC", decomposed[:i] + decomposed[i + 1 :])
            try:
                out += base.encode("cp1258") + decomposed[i].encode("cp1258")
                break
            except UnicodeEncodeError:
                continue
        else:
            raise UnicodeEncodeError("cp1258", char, 0, 1, "no cp1258 spelling")
    return bytes(out)


ASTM_DELIMS = (
    "\r".join(
        [
            r"H|@^\|MSG001||CHEM-SIM^1.0^SN-77|||||LIS||P|LIS2-A2|20240315083000",
            "P|1|PID-VN-001|||Nguyễn^Thị Hồng||19850214|F",
            r"O|1|SPC-1001||^^^GLU@^^^NA@^^^WBC@^^^CRP@^^^URO@^^^K|R||||||N||||Serum",
            r"R|1|^^^GLU^Glucose|>8|mmol/L|3.9 to 6.1|H@A||F||op1||20240315081500|CHEM-SIM-01",
            r"C|1|I|Above linear range\F\ diluted\S\retest \E\ lot \R\ 42|G",
            r"R|2|^^^NA^Sodium|140|mmol/L|135-145|N||C||op1||20240315081500|CHEM-SIM-01",
            r"R|3|^^^WBC^Leukocytes|7.5|10\S\9/L|4.0-10.0|N||F||op1||20240315081500|CHEM-SIM-01",
            r"R|4|^^^CRP^C-reactive protein|<0.5|mg/L|<5|N||F||op1||20240315081500|CHEM-SIM-01",
            r"R|5|^^^URO^Urobilinogen|3+|||||F||op1||20240315081500|CHEM-SIM-01",
            r"R|6|^^^K^Potassium|***.**|mmol/L|3.5-5.1|||X||op1||20240315081500|CHEM-SIM-01",
            "L|1|N",
            r"H|@^\|MSG002||CHEM-SIM^1.0^SN-77|||||LIS||P|LIS2-A2|20240315090000",
            r"O|1|QC-LOT-42||^^^GLU|R||||||Q",
            r"R|1|^^^GLU^Glucose|5.4|mmol/L|5.0-5.8|N||F||op1||20240315085900|CHEM-SIM-01",
            "L|1|N",
            r"H|@^\|MSG003||CHEM-SIM^1.0^SN-77|||||LIS||Q|LIS2-A2|20240315091000",
            "P|1",
            r"O|1|CTRL-HIGH||^^^NA|R",
            r"R|1|^^^NA^Sodium|160|mmol/L||HH||F||op1||20240315090900|CHEM-SIM-01",
            "L|1|N",
        ]
    )
    + "\r"
)

HL7_LATIN1 = (
    "\r\n".join(
        [
            r"MSH|^~\&|CHEMLAB|KLINIKUM|PACSLAB|RAD|20240315083000+0100||ORU^R01^ORU_R01|CTL-8859-1|P|2.5.1|||||DEU|8859/1",
            "PID|1||PAT-4711^^^KLINIKUM^MR||Müller^Jürgen||19700102|M",
            r"ORC|RE|PL-1|FI-1",
            r"OBR|1|PL-1|FI-1|CHEM^Chemistry panel^L|||20240315070000",
            r"OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.9-6.1|N|||F|||20240315081500+0100",
            r"OBX|2|SN|14979-9^aPTT^LN||^>^8|s|||||P|||20240315081500.123-0500",
            r"OBX|3|SN|1988-5^CRP^LN||<^0.5|mg/L|<5|N|||F",
            r"OBX|4|SN|5370-3^Titer^LN||^1^:^128||||||F",
            r"OBX|5|NM|14682-9^Kreatinin^LN||78|µmol/L|59-104||||C",
            r"OBX|6|ST|X-ESC^Escapes^L||a\F\b\S\c\T\d\R\e\E\f \X41\\X42\|||||||F",
            r"OBX|7|TX|X-TX^Befund^L||Zeile eins\.br\Zeile zwei~Absatz zwei||||||F",
            "NTE|1|L|Kommentar zum Befund: geprüft",
            r"OBX|8|CWE|600-7^Blood culture^LN||3092008^Staphylococcus aureus^SCT^SA^Staph aureus^L||||||F",
            r"OBX|9|ED|PDF^Report^L||^application^pdf^Base64^JVBERi0xLjQK||||||F",
            r"OBR|2|PL-2|FI-2|HEM^Haematology^L",
            r"OBX|1|NM|6690-2^Leukozyten^LN||12.5|10*9/L|4.0-10.0|H|||F",
            r"OBX|2|NM|718-7^Haemoglobin^LN||***.**|g/dL|12.0-16.0||||X",
        ]
    )
    + "\r\n"
)

HL7_UTF8 = (
    "\x0b"
    + "\r".join(
        [
            r"MSH|^~\&|HEMA|BVCR|PACSLAB|LAB|20240316101500+0700||ORU^R01|CTL-UTF8-1|P|2.5.1|||||VNM|UNICODE UTF-8",
            "PID|1||BN-2024-001^^^BVCR^MR||Nguyễn^Thị Hồng||19850214|F",
            r"OBR|1|ORD-9|SPC-9|CBC^Tổng phân tích tế bào máu^L",
            r"OBX|1|NM|WBC^Bạch cầu^L^6690-2^Leukocytes^LN||7.5|10\S\9/L|4.0-10.0|N|||F|||20240316100000+0700",
            "NTE|1||Đã kiểm tra lại",
        ]
    )
    + "\r\x1c\r"
    + "\x0b"
    + "\r".join(
        [
            r"MSH|^~\&|HEMA|BVCR|PACSLAB|LAB|20240316110000+0700||OUL^R22^OUL_R22|CTL-UTF8-2|P|2.5.1|||||VNM|UNICODE UTF-8",
            r"SPM|1|QC-CTRL-2&HEMA||CTRL^Control material^L|||||||Q",
            r"OBR|1||QC-CTRL-2|CBC^Tổng phân tích tế bào máu^L",
            r"OBX|1|NM|WBC^Bạch cầu^L||7.1|10\S\9/L|6.5-7.7|N|||F|||20240316105500+0700",
        ]
    )
    + "\r\x1c\r"
)

CSV_DE = (
    "\r\n".join(
        [
            "Laborexport Süd;;;;;;;;;",
            "Probe;Patienten-Nr;Name;Geburtsdatum;Test;Wert;Einheit;Referenz;Kennz.;Datum",
            "S-001;P-77;Müller^Jürgen;02.01.1970;HB;14,3;g/dl;12,0-16,0;N;15.03.2024 08:15",
            "S-001;P-77;Müller^Jürgen;02.01.1970;K;5,6;mmol/l;3,5-5,1;H;15.03.2024 08:15",
            "S-002;P-78;Weiß^Ärmin;30.11.1955;CRP;<0,5;mg/l;<5,0;;15.03.2024 09:40",
            "S-002;P-78;Weiß^Ärmin;30.11.1955;HB;;g/dl;12,0-16,0;;15.03.2024 09:40",
        ]
    )
    + "\r\n"
)

TXT_VI = (
    "\r\n".join(
        [
            "Mã mẫu\tMã BN\tHọ tên\tXét nghiệm\tKết quả\tSố mũ\tĐơn vị\tCờ\tNgày giờ",
            "M-0001\tBN-01\tNguyễn Thị Hồng\tGLU\t548\t-2\tmmol/L\tN\t16/03/2024 07:30",
            "M-0001\tBN-01\tNguyễn Thị Hồng\tWBC\t1275\t-2\t10^9/L\tH\t16/03/2024 07:30",
            "M-0002\tBN-02\tTrần Văn Đức\tGLU\t61\t-1\tmmol/L\t\t16/03/2024 08:05",
            "QC-0001\t\t\tGLU\t540\t-2\tmmol/L\t\t16/03/2024 06:55",
        ]
    )
    + "\r\n"
)


def main() -> None:
    (HERE / "astm" / "ours_astm_delims_at_caret_backslash_utf8_vi.astm").write_bytes(
        ASTM_DELIMS.encode("utf-8")
    )
    architect = (HERE / "astm" / "abbott_architect_multi_message.astm").read_bytes()
    text, long_index = with_long_comment(architect, after_line=4, length=300)
    (HERE / "astm" / "ours_e1381_framed_architect_etb_wrap_long.astm").write_bytes(
        frame_capture(text, max_text=64, whole={long_index})
    )
    (HERE / "hl7" / "ours_oru_r01_v251_8859-1_crlf_value_types.hl7").write_bytes(
        HL7_LATIN1.encode("latin-1")
    )
    (HERE / "hl7" / "ours_oru_oul_v251_utf8_vi_mllp_qc.hl7").write_bytes(HL7_UTF8.encode("utf-8"))
    (HERE / "files" / "ours_decimal_comma_latin1_de.csv").write_bytes(CSV_DE.encode("latin-1"))
    (HERE / "files" / "ours_scaled_int_cp1258_vi.txt").write_bytes(cp1258(TXT_VI))


if __name__ == "__main__":
    main()
